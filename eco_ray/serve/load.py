"""Load-adaptive depth, Ray-free: under load a replica lowers the deepest exit it serves, stepwise, down to a
floor the operator sets, and raises it again when the load has fallen for a while.

The signal is what the replica itself sees: the requests it holds (queued or running) and the recent latency
of its requests (time in the replica: queue wait plus batch). ``level`` 0 serves every exit; level L caps the
exit at the L-th below the deepest. The two thresholds of each signal (tighten at ``*_high``, relax at or
below ``*_low``) and the time between steps are the hysteresis: between the thresholds the level holds, and a
relaxing step needs ``relax_after_s`` of calm since the last change. The level is computed from the clock
when it is read (``observe``), so it relaxes also while no request arrives.

What the cap applies to is ``precedence``: ``request`` (default) honours a request's own control (a forced
exit, a cost budget, a quality target, a beta) as given and caps only the requests without one; ``load`` caps
every request, its own control then choosing among the exits under the cap.

Shedding (``shed_held``, off by default): at the top level, where depth has nothing more to give, a request that
finds ``shed_held`` or more requests held is refused at once (429 + Retry-After) instead of queueing behind them.
With ``floor_exit`` the deepest exit the policy never caps and only sheds: the baseline of shedding alone.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, fields

PRECEDENCE = ("request", "load")


class LoadPolicyError(ValueError):
    """A load policy (the Segmenter's ``user_config.adaptive``) this eco-ray cannot run."""


@dataclass(frozen=True)
class LoadPolicy:
    """The operator's knobs (``user_config.adaptive`` of the Segmenter)."""

    enabled: bool = False
    floor_exit: int | None = None  # the shallowest exit load may push a request to (None: the shallowest exit)
    queue_high: int = 8  # requests held by the replica (queued + running) at which it tightens one level
    queue_low: int = 2  # ... at or below which (latency allowing) it counts as calm
    latency_high_ms: float | None = None  # recent time in the replica at which it tightens (None: queue only)
    latency_low_ms: float | None = None  # ... at or below which it counts as calm (None: latency_high_ms / 2)
    step_s: float = 1.0  # at least this long between two tightening steps (a step needs time to show)
    relax_after_s: float = 5.0  # calm this long since the last change: one level back
    latency_window_s: float = 5.0  # latency older than this is no signal (an idle replica is calm)
    precedence: str = "request"  # "request": a request's own control is honoured as given; "load": caps it too
    shed_held: int | None = None  # at the top level, a request finding this many held is answered 429 at once

    @classmethod
    def parse(cls, raw: dict | None, exits: list[int]) -> LoadPolicy:
        """A policy from a user_config mapping (None: disabled), checked against the model's exits."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise LoadPolicyError(f"adaptive must be a mapping of {[f.name for f in fields(cls)]}, got {raw!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(raw) - known)
        if unknown:
            raise LoadPolicyError(f"adaptive: unknown key(s) {unknown}; known: {sorted(known)}")
        policy = cls(**raw)
        policy.check(exits)
        return policy

    def check(self, exits: list[int]) -> None:
        def number(name, low=0.0, whole=False, optional=False, above=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            try:
                bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) \
                    or v < low or (above and v <= low) or (whole and int(v) != v)
            except OverflowError:
                bad = True
            if bad:
                kind = "a whole number" if whole else "a number"
                raise LoadPolicyError(f"adaptive.{name} must be {kind} {'>' if above else '>='} {low:g}, got {v!r}")

        if not isinstance(self.enabled, bool):
            raise LoadPolicyError(f"adaptive.enabled must be true or false, got {self.enabled!r}")
        if self.floor_exit is not None and (isinstance(self.floor_exit, bool) or self.floor_exit not in exits):
            raise LoadPolicyError(f"adaptive.floor_exit={self.floor_exit!r} is not one of the model's exits {exits}")
        number("queue_high", 1, whole=True)
        number("queue_low", 0, whole=True)
        if self.queue_low >= self.queue_high:
            raise LoadPolicyError(f"adaptive.queue_low ({self.queue_low}) must be below queue_high "
                                  f"({self.queue_high}): the gap is the hysteresis")
        number("latency_high_ms", 0, optional=True, above=True)  # 0 would be pressure for ever
        number("latency_low_ms", 0, optional=True)
        if self.latency_low_ms is not None and self.latency_high_ms is None:
            raise LoadPolicyError("adaptive.latency_low_ms needs latency_high_ms")
        if self.latency_high_ms is not None and self.latency_low_ms is not None \
                and self.latency_low_ms >= self.latency_high_ms:
            raise LoadPolicyError(f"adaptive.latency_low_ms ({self.latency_low_ms}) must be below latency_high_ms "
                                  f"({self.latency_high_ms})")
        number("step_s", 0)
        number("relax_after_s", 0, above=True)  # 0 would relax at once: the level would flap
        number("latency_window_s", 0, above=True)  # 0 would make every latency stale: no signal
        number("shed_held", 1, whole=True, optional=True)
        if self.precedence not in PRECEDENCE:
            raise LoadPolicyError(f"adaptive.precedence must be one of {list(PRECEDENCE)}, got {self.precedence!r}")

    def as_dict(self) -> dict:
        return asdict(self)


class LoadController:
    """The adaptive level of one replica: fed the requests it holds and the latency of those it finished.
    Thread-safe: Serve runs a replica's health check and sync methods in threads beside its event loop."""

    def __init__(self, policy: LoadPolicy, exits: list[int], now: float = 0.0):
        self.policy, self.exits = policy, list(exits)
        self.floor_exit = policy.floor_exit if policy.floor_exit is not None else self.exits[0]
        self.max_level = (len(self.exits) - 1 - self.exits.index(self.floor_exit)) if policy.enabled else 0
        self.level = 0
        self.changed_at = now  # the last level change
        self.calm_since: float | None = now
        self.busy_at = now  # the last reading that was not calm
        self.latency_ms: float | None = None  # an exponential average of the recent requests' time in the replica
        self.latency_at = -math.inf
        self._lock = threading.Lock()

    @property
    def exit_cap(self) -> int:
        """The deepest exit served at the current level."""
        return self.exits[len(self.exits) - 1 - self.level]

    def record_latency(self, ms: float, now: float) -> None:
        with self._lock:
            fresh = now - self.latency_at <= self.policy.latency_window_s
            self.latency_ms = ms if self.latency_ms is None or not fresh else 0.7 * self.latency_ms + 0.3 * ms
            self.latency_at = now

    def observe(self, held: int, now: float) -> tuple[int, int]:
        """(level, exit cap) at ``now`` with ``held`` requests on the replica (queued + running)."""
        p = self.policy
        if not p.enabled:
            return 0, self.exits[-1]
        with self._lock:
            stale_at = self.latency_at + p.latency_window_s
            latency = self.latency_ms if now <= stale_at else None
            low_ms = p.latency_low_ms if p.latency_low_ms is not None else \
                (p.latency_high_ms / 2 if p.latency_high_ms is not None else None)
            pressure = held >= p.queue_high or (p.latency_high_ms is not None and latency is not None
                                                and latency >= p.latency_high_ms)
            calm = held <= p.queue_low and (low_ms is None or latency is None or latency <= low_ms)
            if pressure:
                self.calm_since, self.busy_at = None, now
                if self.level < self.max_level and now - self.changed_at >= p.step_s:
                    self.level += 1
                    self.changed_at = now
            elif calm:
                if self.calm_since is None:
                    # calm from this reading on; or, where latency held it off and has since gone stale, from
                    # the moment it went stale (no reading need come then: an idle replica relaxes on time)
                    stale = p.latency_high_ms is not None and latency is None and stale_at > self.busy_at
                    self.calm_since = min(now, stale_at) if stale else now
                start = max(self.calm_since, self.changed_at)
                steps = min(self.level, int((now - start) // p.relax_after_s))
                if steps:
                    self.level -= steps
                    self.changed_at = start + steps * p.relax_after_s
            else:  # between the thresholds: hold, and calm starts anew
                self.calm_since, self.busy_at = None, now
            self.level = max(0, min(self.level, self.max_level))
            return self.level, self.exit_cap

    def sheds(self, held: int, now: float) -> bool:
        """Whether a request arriving now, with ``held`` on the replica, is refused (429): only at the top level
        (the floor reached: depth has no more to give) and with ``shed_held`` or more held. Waiting behind a
        queue the replica cannot clear in time is worse than a fast retry elsewhere."""
        p = self.policy
        if not p.enabled or p.shed_held is None or held < p.shed_held:
            return False
        return self.observe(held, now)[0] == self.max_level

    def state(self) -> dict:
        """What /v1/models and the metrics show."""
        with self._lock:
            return {"enabled": self.policy.enabled, "level": self.level, "max_level": self.max_level,
                    "exit_cap": self.exit_cap, "floor_exit": self.floor_exit,
                    "recent_latency_ms": None if self.latency_ms is None else round(self.latency_ms, 2),
                    "policy": self.policy.as_dict()}
