"""The sections of `R8Config` for what hf_r8 does to a training run besides scaling the LR: the LR range
test at the start, the end-of-run anneal, the balanced sampler and its loss catalog, the rollback guard,
the exploration dither and the freezing of quiet tensors.

Fields carry their help in ``field(metadata={"help": ...})``; `_check` holds each section's range and
cross-field checks. This module only describes and checks the knobs (the machinery lives in
hf_r8/runtime, hf_r8/data and range_test.py / rollback.py) and knows nothing of torch or transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from hf_r8.control.config_types import ValidatedConfig, reject

SNAPSHOT_SCOPES = ("trainable", "all")
DITHER_SHAPINGS = ("rms", "magnitude")


@dataclass
class RangeTestConfig(ValidatedConfig):
    """LR range test at the start of training, on by default.

    Under the Trainer it runs before the first counted step, on the run's first batches (the Trainer sees
    none of it); in `AdaptiveScheduler` and `R8Loop` its steps are the run's first. Its optimizer steps sweep
    the LR exponentially from gain_min to gain_max times the base LR (stopping early once the loss runs
    away); then model and optimizer are restored from the CPU-RAM snapshot rollback keeps anyway, and
    training goes on at (the gain of the lowest denoised loss) / backoff, which becomes the controller's new
    base (on a curve flat within its noise, as a pre-trained model's often is, the gain where it blows up /
    backoff). A choice within `keep_band` of the user's LR keeps it: the test cannot tell LRs that close
    apart; so does a choice below it, unless the curve shows the user's LR too high
    (`keep_unless_too_high`): "minimum / 10" is a margin for choosing, not evidence against an LR
    that the curve shows still good. `enabled: false` leaves the user's LR as it is.
    """

    SECTION: ClassVar[str] = "range_test"
    enabled: bool = field(default=True, metadata={
        "help": "Run the test (the search for the LR); false keeps the LR the user set."})
    steps: int | None = field(default=None, metadata={
        "help": "Optimizer steps spent on the test; None sizes it to the run: budget_fraction of max_steps, "
                "within [min_steps, max_steps]."})
    budget_fraction: float = field(default=0.04, metadata={
        "help": "Share of the run's steps an automatically sized test takes."})
    min_steps: int = field(default=15, metadata={
        "help": "Fewest steps of an automatically sized test (fewer cannot resolve the loss curve)."})
    max_steps: int = field(default=100, metadata={
        "help": "Most steps of an automatically sized test (a long run needs no longer one)."})
    max_budget_fraction: float = field(default=0.1, metadata={
        "help": "An automatically sized test that would take more than this share of the run is skipped (short runs, "
                "and runs of unknown length, keep the user's LR)."})
    gain_min: float = field(default=0.01, metadata={"help": "First gain of the sweep."})
    gain_max: float = field(default=100_000.0, metadata={
        "help": "Last gain of the sweep (wide above the LR set: losses are credited to the step before, and a curve "
                "still falling at the sweep's top gives too low an LR)."})
    smoothing: float = field(default=0.7, metadata={
        "help": "EMA smoothing (bias-corrected) of the test's losses, for stopping once they run away."})
    divergence_ratio: float = field(default=4.0, metadata={
        "help": "Stop early once the smoothed loss exceeds this multiple of its minimum; a single loss above it "
                "(or a non-finite one) is a fault, left out of the curve with its update skipped."})
    divergence_patience: int = field(default=3, metadata={
        "help": "Faults in a row that make the blow-up that ends the test (one alone is a bad batch)."})
    backoff: float = field(default=10.0, metadata={
        "help": "Chosen gain = gain at the denoised-loss minimum / backoff."})
    keep_band: float = field(default=3.0, metadata={
        "help": "A chosen gain within [1/keep_band, keep_band] keeps gain 1 (the user's "
                "LR); 1 always takes the choice."})
    significance: float = field(default=3.0, metadata={
        "help": "Noise deviations that make a valley (the minimum below the level of the sweep's first "
                "third) or a blow-up (a loss above it); without a valley the choice is the blow-up's gain / "
                "backoff. 0: always the minimum's."})
    keep_unless_too_high: bool = field(default=True, metadata={
        "help": "Lower the LR set only where the curve shows it too high (blown up at or below it); a lower "
                "choice otherwise keeps it. False: the curve's choice either way."})

    def _check(self) -> None:
        if self.steps is not None and self.steps < 5:
            reject(self.SECTION, "steps", self.steps, "an integer >= 5 or null")
        self._between("budget_fraction", 0.0, 1.0, open_low=True, open_high=True)
        self._positive_int("min_steps")
        if self.min_steps < 5:
            reject(self.SECTION, "min_steps", self.min_steps, "an integer >= 5")
        self._positive_int("max_steps")
        if self.max_steps < self.min_steps:
            reject(self.SECTION, "max_steps", self.max_steps, f">= range_test.min_steps ({self.min_steps})")
        self._between("max_budget_fraction", 0.0, 1.0, open_low=True, open_high=True)
        self._greater("gain_min", 0.0)
        self._greater("gain_max", self.gain_min)
        self._between("smoothing", 0.0, 1.0, open_high=True)
        self._positive_int("divergence_patience")
        self._greater("divergence_ratio", 1.0)
        self._greater("backoff", 1.0, inclusive=True)
        self._greater("keep_band", 1.0, inclusive=True)
        self._greater("significance", 0.0, inclusive=True)


@dataclass
class AnnealConfig(ValidatedConfig):
    """End-of-run anneal when the schedule will not decay in time (constant LR, a plain loop).

    At `start_fraction` of the planned steps R8 reads the schedule ahead (a `LambdaLR`, as every named schedule
    of the Trainer is; others by their value then): if it stays above `flat_threshold` of its peak until the
    end, R8 decays the LR itself over the rest of the run (1 - sqrt of the progress, the cooldown of
    warmup-stable-decay schedules) down to the lower bound, and says so once. A schedule that decays before
    the end (cosine, linear, warmup-stable-decay, cosine with restarts) is left alone, and so is a run too
    short for the LR range test.
    """

    SECTION: ClassVar[str] = "anneal"
    enabled: bool = field(default=True, metadata={"help": "Anneal at the end of a run whose schedule does not decay."})
    start_fraction: float = field(default=0.8, metadata={
        "help": "Share of the planned steps after which the anneal starts."})
    flat_threshold: float = field(default=0.5, metadata={
        "help": "The schedule counts as not decaying if its LR stays above this share of its peak from the "
                "anneal's start to the run's end."})

    def _check(self) -> None:
        self._between("start_fraction", 0.0, 1.0, open_low=True, open_high=True)
        self._between("flat_threshold", 0.0, 1.0, open_low=True, open_high=True)


@dataclass
class SamplerConfig(ValidatedConfig):
    """Per-example loss catalog and balanced quartile batches (R8Trainer / with_r8 only)."""

    SECTION: ClassVar[str] = "sampler"
    enabled: bool = field(default=True, metadata={
        "help": "Own the train sampler (and keep the catalog); False leaves the Trainer's sampling alone."})
    mode: str = field(default="balanced", metadata={
        "help": 'After the cataloging epoch: "balanced" (quartile mix per batch), "infobatch" (prune well-learned '
                "examples at random, rescale the kept ones' loss) or "
                '"uniform" (a plain shuffle; the catalog is still kept).'})
    prune_ratio: float = field(default=0.5, metadata={
        "help": "infobatch: chance that an example below the mean EMA loss is left out of an epoch."})
    full_data_fraction: float = field(default=0.125, metadata={
        "help": "infobatch: the last share of the planned epochs trains on full data again."})
    proportions: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25, 0.25], metadata={
        "help": "Share of each batch drawn from Q1 (lowest loss) ... Q4 (highest)."})
    catalog_alpha: float = field(default=0.3, metadata={
        "help": "EMA weight of a new per-example loss (and of the surprise in the batch-loss fallback)."})

    def _check(self) -> None:
        values = self.proportions
        if len(values) != 4 or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
            reject(self.SECTION, "proportions", values, "a list of 4 finite numbers >= 0 with a positive sum")
        if not self.mode:
            reject(self.SECTION, "mode", self.mode, "the name of a sampler mode")
        self._between("prune_ratio", 0.0, 1.0, open_high=True)
        self._between("full_data_fraction", 0.0, 1.0)
        self._between("catalog_alpha", 0.0, 1.0, open_low=True)


@dataclass
class RollbackConfig(ValidatedConfig):
    """Guard against non-finite steps and roll back from a CPU-RAM snapshot after a loss spike.

    Before each optimizer step, a non-finite loss or gradient norm (on any process) skips the step,
    and so does a loss spike (z-score against the recent healthy losses, or ratio to their EMA).
    A second spike in a row, or non-finite weights, restore the last healthy snapshot, drop the step
    in flight, restart the LR lower and feed low-loss batches for a while (R8Trainer). Rollbacks in a
    row back off (a lasting LR cut); `max_consecutive` of them stop training with the healthy state
    saved as a checkpoint. Under DeepSpeed the engine skips a non-finite step itself and a spike's step is
    already applied (a second one rolls back); snapshots are off under FSDP1.
    """

    SECTION: ClassVar[str] = "rollback"
    enabled: bool = field(default=True, metadata={
        "help": "Take snapshots and roll back; the non-finite guard (`guard_nonfinite`) works either way."})
    guard_nonfinite: bool = field(default=True, metadata={
        "help": "Skip an optimizer step whose loss or gradient norm is NaN/inf (reads both "
                "on the host: one sync per step)."})
    every_steps: int = field(default=50, metadata={
        "help": "Optimizer steps between snapshots (taken only when the recent steps were healthy)."})
    keep: int = field(default=1, metadata={
        "help": "Snapshots kept in RAM; the n-th rollback in a row returns to the n-th newest (as far as kept)."})
    healthy_steps: int = field(default=10, metadata={
        "help": "A snapshot needs this many anomaly-free steps before it."})
    window: int = field(default=50, metadata={"help": "Recent healthy losses the spike test compares against."})
    min_history: int = field(default=20, metadata={"help": "Losses needed in the window before a spike can be called."})
    spike_z: float = field(default=5.0, metadata={
        "help": "A loss this many noise standard deviations (from the window's step-to-step changes) above the EMA "
                "of the healthy losses is a spike..."})
    spike_ratio: float = field(default=3.0, metadata={"help": "...or a loss this many times that EMA."})
    spike_min_setback: float = field(default=0.25, metadata={
        "help": "...and, either way, a loss that gives back at least this share of the progress made since training "
                "started (the first loss minus the EMA): near zero, a loss of 0.1 after a level of 0.03 is one hard "
                "example in the batch, not damage."})
    lr_cut: float = field(default=0.5, metadata={
        "help": "After a rollback the LR restarts at this multiple and returns to 1x over the stabilization; the "
                "n-th rollback in a row also cuts the gain for good by lr_cut**(n-1)."})
    stabilize_steps: int = field(default=20, metadata={
        "help": "Steps of stabilization after a rollback (doubles per repeat): the LR's way back to 1x, and the "
                "batches drawn from the lowest-loss quartile (R8Trainer sampling only)."})
    max_consecutive: int = field(default=3, metadata={
        "help": "Rollbacks in a row (no healthy snapshot 2 x every_steps after the last) before training stops."})
    scope: str = field(default="trainable", metadata={
        "help": 'What a snapshot holds besides optimizer state and buffers: "trainable" parameters (PEFT: the '
                'adapters) or "all" parameters.'})
    max_ram_fraction: float = field(default=0.5, metadata={
        "help": "Snapshots may use at most this share of the host RAM available at the "
                "first one, or rollback turns off."})

    def _check(self) -> None:
        for name in ("every_steps", "keep", "healthy_steps", "window", "min_history", "max_consecutive"):
            self._positive_int(name)
        self._non_negative_int("stabilize_steps")
        if self.min_history > self.window:
            reject(self.SECTION, "min_history", self.min_history, f"<= window ({self.window})")
        self._greater("spike_z", 0.0)
        self._greater("spike_ratio", 1.0)
        self._between("spike_min_setback", 0.0, 1.0)
        self._between("lr_cut", 0.0, 1.0, open_low=True)
        if self.scope not in SNAPSHOT_SCOPES:
            reject(self.SECTION, "scope", self.scope, f"one of {list(SNAPSHOT_SCOPES)}")
        self._between("max_ram_fraction", 0.0, 1.0, open_low=True)


@dataclass
class ExplorationConfig(ValidatedConfig):
    """Exploration dither: its strength sigma is raised on plateaus and cut on instability (see dither.py)."""

    SECTION: ClassVar[str] = "exploration"
    enabled: bool = field(default=False, metadata={
        "help": "Run the sigma law and add its dither to the trainable parameters after each optimizer step (past "
                "warmup, never on a skipped step): sigma * D(theta) * standard normal noise."})
    shaping: str = field(default="rms", metadata={
        "help": "D(theta): `rms` (each tensor's root-mean-square: noise relative to the tensor's scale) or "
                "`magnitude` (each element's absolute value: zeros stay zero)."})
    seed: int = field(default=0, metadata={
        "help": "Noise seed; with the step number it makes the same noise on every process (parameters stay equal)."})
    sigma_init: float = field(default=1e-3, metadata={"help": "Starting sigma."})
    sigma_min: float = field(default=1e-5, metadata={"help": "Lowest sigma."})
    sigma_max: float = field(default=1e-2, metadata={"help": "Highest sigma."})
    raise_factor: float = field(default=1.5, metadata={"help": "Multiplier on a plateau window."})
    cut_factor: float = field(default=0.5, metadata={"help": "Multiplier on an unstable window or a spike."})

    def _check(self) -> None:
        self._greater("sigma_min", 0.0, inclusive=True)
        self._greater("sigma_max", self.sigma_min)
        self._between("sigma_init", self.sigma_min, self.sigma_max)
        self._greater("raise_factor", 1.0)
        self._between("cut_factor", 0.0, 1.0, open_low=True, open_high=True)
        if self.shaping not in DITHER_SHAPINGS:
            reject(self.SECTION, "shaping", self.shaping, f"one of {list(DITHER_SHAPINGS)}")
        self._non_negative_int("seed")


@dataclass
class FreezingConfig(ValidatedConfig):
    """Reversible freezing of parameter tensors whose gradients went quiet."""

    SECTION: ClassVar[str] = "freezing"
    enabled: bool = field(default=False, metadata={
        "help": "Freeze quiet tensors (no gradient computed, no optimizer update) and unfreeze revived ones."})
    check_every: int = field(default=10, metadata={
        "help": "Steps between reads of the per-tensor gradient norms (one host read each time)."})
    ema_beta: float = field(default=0.7, metadata={
        "help": "Smoothing of each tensor's gradient-norm EMA, updated at every check."})
    threshold: float = field(default=0.01, metadata={
        "help": "A tensor is quiet while its gradient-norm EMA is below this fraction of the "
                "median EMA of the unfrozen tensors."})
    patience_steps: int = field(default=50, metadata={"help": "Steps a tensor must stay quiet before it is frozen."})
    probe_every: int = field(default=100, metadata={
        "help": "Steps between probes: frozen tensors get a gradient for one step (not applied) to see if it "
                "revived. A multiple of check_every."})
    revive_threshold: float = field(default=0.05, metadata={
        "help": "A probed tensor whose gradient norm exceeds this fraction of the median EMA is unfrozen (above "
                "`threshold`: a tensor near the line does not flip at every probe)."})
    max_frozen_fraction: float = field(default=0.9, metadata={
        "help": "Never freeze more than this fraction of the trainable parameters (by element count)."})

    def _check(self) -> None:
        self._positive_int("check_every")
        self._between("ema_beta", 0.0, 1.0, open_high=True)
        self._between("threshold", 0.0, 1.0, open_low=True)
        self._positive_int("patience_steps")
        self._positive_int("probe_every")
        if self.probe_every % self.check_every:
            reject(self.SECTION, "probe_every", self.probe_every, f"a multiple of check_every ({self.check_every})")
        self._greater("revive_threshold", self.threshold)
        self._between("max_frozen_fraction", 0.0, 1.0, open_low=True, open_high=True)
