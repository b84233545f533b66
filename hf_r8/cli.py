"""`hf-r8` command line: `hf-r8 demo`, `hf-r8 presets`, `hf-r8 report OUTPUT_DIR`."""

from __future__ import annotations

import argparse

from hf_r8.config import R8Config, available_presets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-r8", description="learnit::r8 for Hugging Face")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small GPT-2 with R8Callback and show its decisions")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--preset", default="default", choices=available_presets())
    demo.add_argument("--learning-rate", type=float, default=1e-3)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--model", default=None, help="a Hub model name; falls back to the offline tiny GPT-2")
    demo.add_argument("--output-dir", default="outputs/demo")

    commands.add_parser("presets", help="list the shipped presets and their active rules")

    report = commands.add_parser("report", help="plots and a summary of a run from its r8_*.jsonl files")
    report.add_argument("output_dir", help="the Trainer's output_dir of the run")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from hf_r8.demo import DemoSettings, run_demo

        run_demo(DemoSettings(steps=args.steps, preset=args.preset, learning_rate=args.learning_rate,
                              batch_size=args.batch_size, model=args.model, output_dir=args.output_dir))
    elif args.command == "report":
        from hf_r8.report import write_report

        try:
            written = write_report(args.output_dir)
        except FileNotFoundError as error:
            raise SystemExit(f"hf-r8 report: {error}") from error
        print("\n".join(str(path) for path in written))
    elif args.command == "presets":
        for name in available_presets():
            config = R8Config.from_preset(name)
            print(f"{name:14s} rules={config.rules} reward={config.reward.rules} momentum={config.momentum.rule} "
                  f"moe={config.moe.enabled}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
