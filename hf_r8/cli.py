"""`hf-r8` command line: `hf-r8 demo`, `hf-r8 presets`, `hf-r8 report OUTPUT_DIR`, `hf-r8 config-reference`.

Only `demo` needs torch and transformers (seconds to import): each command imports what it uses, inside
it, so `presets`, `config-reference` and `report` start at once.
"""

from __future__ import annotations

import argparse
import sys

from hf_r8.control.config import R8Config, available_presets


def _add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    """The demo's options; their defaults and choices come from `hf_r8.demo.run` (it imports torch)."""
    from hf_r8.demo.run import MODEL_SIZES, DemoSettings

    demo.add_argument("--steps", type=int, default=DemoSettings.steps)
    demo.add_argument("--train-examples", type=int, default=DemoSettings.train_examples,
                      help="blocks of 128 tokens to train on (0: all); the default makes 300 steps 4 epochs")
    demo.add_argument("--model-size", default=DemoSettings.model_size, choices=sorted(MODEL_SIZES),
                      help="shape of the GPT-2 built from a config when offline")
    demo.add_argument("--preset", default=DemoSettings.preset, choices=available_presets())
    demo.add_argument("--output-dir", default=DemoSettings.output_dir)
    demo.add_argument("--no-dashboard", action="store_true", help="periodic lines instead of the live dashboard")
    demo.add_argument("--compare", action=argparse.BooleanOptionalAction, default=DemoSettings.compare,
                      help="first train the same model with the stock Trainer's cosine schedule, for the summary and "
                           "compare.png (--no-compare: hf_r8 alone)")
    demo.add_argument("--learning-rate", type=float, default=None,
                      help="default: 5e-5 for the pretrained gpt2, 1e-3 for a model trained from scratch")
    demo.add_argument("--batch-size", type=int, default=DemoSettings.batch_size)
    demo.add_argument("--model", default=DemoSettings.model, help="the Hub model to fine-tune when online")
    demo.add_argument("--offline", action="store_true", help="do not ask the Hub: use the offline fallback")


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The `hf-r8` parser; the demo's options only when `command` is "demo" (they import torch)."""
    parser = argparse.ArgumentParser(prog="hf-r8", description="learnit::r8 for Hugging Face")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="fine-tune GPT-2 on WikiText-2 with hf_r8 (offline: a GPT-2 from config "
                                            "on local text), then plot and summarize the run")
    if command == "demo":
        _add_demo_arguments(demo)

    commands.add_parser("presets", help="list the shipped presets and their active rules")

    commands.add_parser("config-reference", help="print the configuration reference (Markdown) from the dataclasses")

    report = commands.add_parser("report", help="plots and a summary of a run from its r8_*.jsonl files")
    report.add_argument("output_dir", help="the Trainer's output_dir of the run (its run files in r8/ or in it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The top-level parser has no option but --help: the first word that is not an option names the command.
    command = next((word for word in argv if not word.startswith("-")), None)
    args = _parser(command).parse_args(argv)
    if args.command == "demo":
        from hf_r8.demo.run import DemoSettings, run_demo

        run_demo(DemoSettings(steps=args.steps, train_examples=args.train_examples or None,
                              model_size=args.model_size, preset=args.preset,
                              output_dir=args.output_dir, dashboard=not args.no_dashboard, compare=args.compare,
                              learning_rate=args.learning_rate, batch_size=args.batch_size, model=args.model,
                              offline=args.offline))
    elif args.command == "report":
        from hf_r8.ui.report import write_report

        try:
            written = write_report(args.output_dir)
        except (OSError, ValueError) as error:  # what is wrong with the folder, said without a traceback
            raise SystemExit(f"hf-r8 report: {error}") from error
        print("\n".join(str(path) for path in written))
    elif args.command == "config-reference":
        from hf_r8.control.config_reference import config_reference

        print(config_reference(), end="")
    elif args.command == "presets":
        for name in available_presets():
            config = R8Config.from_preset(name)
            print(f"{name:14s} rules={config.rules} reward={config.reward.rules} momentum={config.momentum.rule} "
                  f"moe={config.moe.enabled}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
