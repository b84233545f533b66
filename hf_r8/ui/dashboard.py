"""The live view of a run: what the controller does and why, drawn with `rich` on the main process.

`render(view)` turns a `DashboardView` (plain numbers, filled by `R8Callback`) into one rich
renderable: a progress bar with steps/s and ETA; loss, its EMA and a sparkline; the LR used against
the schedule's; gain, momentum, reward, gradient norm; rollbacks and skipped steps; the catalog's
quartile losses and batch mix (R8Trainer); the last decisions with their reasons.

`Dashboard` shows it: a `rich.live.Live` refreshed a few times a second on a terminal or in
Jupyter (with ipywidgets), and the Trainer's tqdm training bar is muted meanwhile (see
`compat.mute_training_bar`). Jupyter without ipywidgets cannot redraw rich output in place: there the
Trainer's own notebook bar stays, and a compact panel is printed at the first step and then every
`notebook_interval_s`, the whole view at the end. Anywhere else (a pipe, a file, CI, `nohup`, a terminal
with `TERM=dumb`, which cannot redraw either) plain lines: one when training starts, one for what the LR
range test does and decides, one every `line_interval_s`, and one at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from hf_r8.control.events import Event

logger = logging.getLogger(__name__)

SPARK = "▁▂▃▄▅▆▇█"
_SPARK_POINTS = 48
_DECISIONS_SHOWN = 6


def sparkline(values: Iterable[float]) -> str:
    """Unicode block sparkline of the finite values (empty when there are none)."""
    finite = [value for value in values if value == value and abs(value) != float("inf")]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    span = high - low or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((value - low) / span * len(SPARK)))] for value in finite)


@dataclass
class DashboardView:
    """Everything the dashboard shows, as plain numbers and strings."""

    step: int = 0
    max_steps: int = 0
    first_step: int = 0
    """The step this run started at (a resumed run's checkpoint), for steps/s."""
    started: float = field(default_factory=time.monotonic)
    loss: float | None = None
    loss_ema: float | None = None
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=_SPARK_POINTS))
    lr: float | None = None
    base_lr: float | None = None
    gain: float | None = None
    momentum: float | None = None
    reward: float | None = None
    grad_norm: float | None = None
    rollbacks: int = 0
    skipped_steps: int = 0
    quartile_losses: list[float] = field(default_factory=list)
    batch_mix: list[float] = field(default_factory=list)
    range_test: str | None = None
    """The LR range test's state: the sweep while it runs, then its curve and the LR it chose."""
    decisions: deque[str] = field(default_factory=lambda: deque(maxlen=_DECISIONS_SHOWN))

    def steps_per_second(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.step - self.first_step) / elapsed if elapsed > 0 else 0.0

    def eta_seconds(self) -> float | None:
        rate = self.steps_per_second()
        return (self.max_steps - self.step) / rate if rate > 0 and self.max_steps else None


def show_event(view: DashboardView, dashboard: Dashboard | None, event: Event) -> None:
    """A decision of the whole run (group -1) or of the first group, among the view's last decisions; the
    anneal, once a run, also as a line where nothing redraws."""
    if event.group <= 0:
        view.decisions.append(f"step {event.step} {event.rule}/{event.action}: {event.reason}")
    if event.rule == "anneal" and dashboard is not None:
        dashboard.announce(f"step {event.step}: anneal: {event.reason}")


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def render(view: DashboardView) -> Group:
    """The dashboard as one rich renderable."""
    progress = Table.grid(expand=True)
    progress.add_column(ratio=3)
    progress.add_column(justify="right")
    bar = ProgressBar(total=max(1, view.max_steps), completed=view.step)
    progress.add_row(bar, f"step {view.step}/{view.max_steps}  {view.steps_per_second():.2f} steps/s  "
                          f"ETA {_duration(view.eta_seconds())}")

    signals = Table(box=None, show_header=False, expand=True)
    signals.add_column(style="bold cyan", no_wrap=True)
    signals.add_column()
    signals.add_row("loss", f"{_number(view.loss)}  (EMA {_number(view.loss_ema)})  {sparkline(view.losses)}")
    signals.add_row("LR used / schedule", f"{_number(view.lr)} / {_number(view.base_lr)}  (gain {_number(view.gain)})")
    if view.momentum is not None:
        signals.add_row("momentum", _number(view.momentum))
    if view.reward is not None:
        signals.add_row("reward", _number(view.reward))
    signals.add_row("grad norm", _number(view.grad_norm))
    if view.range_test is not None:
        signals.add_row("LR range test", view.range_test)
    signals.add_row("rollbacks / skipped steps", f"{view.rollbacks} / {view.skipped_steps}")
    if view.quartile_losses:
        signals.add_row("catalog Q1…Q4 loss", "  ".join(_number(value, 3) for value in view.quartile_losses))
    if view.batch_mix:
        signals.add_row("batch mix Q1…Q4", "  ".join(f"{share:.0%}" for share in view.batch_mix))

    decisions = Text("\n".join(view.decisions) if view.decisions else "no decision yet", overflow="fold")
    return Group(Panel(progress, title="hf_r8 · learnit::r8", border_style="cyan"),
                 Panel(signals, title="signals", border_style="blue"),
                 Panel(decisions, title="last decisions", border_style="magenta"))


def plain_line(view: DashboardView) -> str:
    """The one-line form for logs that are not a terminal."""
    parts = [f"r8 step {view.step}/{view.max_steps}", f"loss {_number(view.loss)}", f"ema {_number(view.loss_ema)}",
             f"lr {_number(view.lr)} (x{_number(view.gain)})", f"grad {_number(view.grad_norm)}",
             f"rollbacks {view.rollbacks}", f"skipped {view.skipped_steps}",
             f"{view.steps_per_second():.2f} steps/s", f"ETA {_duration(view.eta_seconds())}"]
    return "  ".join(parts)


def compact(view: DashboardView) -> Panel:
    """The one-line form and the last decision in a small panel, for notebooks that cannot redraw."""
    text = Text(plain_line(view))
    if view.decisions:
        text.append("\n" + view.decisions[-1])
    if view.range_test is not None:
        text.append("\nLR range test: " + view.range_test)
    return Panel(text, title="hf_r8", border_style="cyan")


class Dashboard:
    """Shows a `DashboardView`: live on a terminal or in Jupyter, periodic lines elsewhere.

    Observability, not training: an OS error while drawing (a closed pipe, a full disk under a redirected
    stdout) logs one warning and turns the dashboard off.
    """

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4.0,
                 line_interval_s: float = 30.0, notebook_interval_s: float = 10.0) -> None:
        self.console = console if console is not None else Console()
        # rich redraws in place on a capable terminal, and in Jupyter through ipywidgets; elsewhere, printed output
        self.interactive = (self.console.is_terminal and not self.console.is_dumb_terminal) or (
            self.console.is_jupyter and importlib.util.find_spec("ipywidgets") is not None)
        self.notebook = self.console.is_jupyter and not self.interactive
        self.refresh_interval = 1.0 / refresh_per_second
        self.line_interval_s = notebook_interval_s if self.notebook else line_interval_s
        self._live: Live | None = None
        self._last_draw = 0.0
        self.failed = False

    def _turn_off(self, error: OSError) -> None:
        self.failed = True
        logger.warning("R8 dashboard is off from now on: drawing it failed (%s). Training goes on.", error)
        if self._live is not None:
            with contextlib.suppress(OSError):
                self._live.stop()
            self._live = None

    def _attempt(self, draw: Callable[[], None]) -> None:
        """`draw()`; an OS error turns the dashboard off (see the class docstring)."""
        try:
            draw()
        except OSError as error:
            self._turn_off(error)

    def start(self, view: DashboardView) -> None:
        self._attempt(lambda: self._start(view))

    def _start(self, view: DashboardView) -> None:
        if self.interactive:
            self._live = Live(render(view), console=self.console, refresh_per_second=1.0 / self.refresh_interval,
                              transient=False)
            self._live.start()
        elif not self.notebook:  # a log that says nothing until the first interval looks like a hung job
            self._print(f"r8: training from step {view.first_step} to {view.max_steps}; a line every "
                        f"{self.line_interval_s:g} s")
        # In a notebook the first step is shown at once: a cell that prints nothing looks like a hung kernel.
        self._last_draw = -math.inf if self.notebook else time.monotonic()

    def announce(self, line: str) -> None:
        """A one-off line (what the LR range test does): printed at once unless the live view shows it."""
        if not self.failed and self._live is None:
            self._attempt(lambda: self._print(f"r8: {line}"))

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def update(self, view: DashboardView, force: bool = False) -> None:
        """Redraw, at most every refresh interval (live) or line interval (plain), unless forced."""
        now = time.monotonic()
        interval = self.refresh_interval if self._live is not None else self.line_interval_s
        if self.failed or (not force and now - self._last_draw < interval):
            return
        self._last_draw = now
        self._attempt(lambda: self._draw(view))

    def _draw(self, view: DashboardView) -> None:
        if self._live is not None:
            self._live.update(render(view))
        elif self.notebook:
            self.console.print(compact(view))
        else:
            self._print(plain_line(view))

    def stop(self, view: DashboardView) -> None:
        if not self.failed:
            self._attempt(lambda: self._stop(view))

    def _stop(self, view: DashboardView) -> None:
        if self._live is not None:
            self._live.update(render(view))
            self._live.stop()
            self._live = None
        elif self.console.is_jupyter:  # without ipywidgets: the whole view once, rendered in the cell's output
            self.console.print(render(view))
        else:
            self._print(f"{plain_line(view)}  (end)")
