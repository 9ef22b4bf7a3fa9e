"""Model variants: several bundles served at once, members split between them.

``UNICORN_VARIANTS=champion=bundles/a,challenger=bundles/b:10`` serves two bundles: 10% of
members get ``challenger``, the rest ``champion``. An entry is ``name=path[:percent]``;
entries without a percent share equally what the others leave. The first entry is the
champion: it answers requests that carry no user id, ``/catalogue/sample`` and the
``model_version`` of ``/readyz``. Unset, one variant named ``default`` serves
``UNICORN_BUNDLE``, as before variants existed.

The split is a salted hash of the user id (``UNICORN_VARIANT_SALT``) into 10,000 buckets,
so a member stays in one variant across requests, workers and replicas, and moves only
when the shares or the salt change. A request may name its variant (``"variant"``).

Each variant is its own ``ModelHolder`` (``app.serving.model_holder.Variants``): verified,
warmed and reloaded on its own (``POST /admin/reload {"variant": ...}``); SIGHUP reloads
them all. The shadow bundle (``app.serving.shadow``), when configured, is one more holder,
named ``shadow``, that answers no request.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VARIANT = "default"
SHADOW = "shadow"  # the shadow bundle's holder; never a served variant
BUCKETS = 10_000  # a share is set to 0.01% of members
NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class VariantSpec:
    """One served bundle and the percent of members it gets."""

    name: str
    bundle: Path
    percent: float


def parse_variants(text: str, default_bundle: Path) -> tuple[VariantSpec, ...]:
    """``name=path[:percent],...`` as specs whose percents sum to 100 (raises
    ``ValueError`` naming the rule); empty text: ``default`` serving ``default_bundle``."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        return (VariantSpec(DEFAULT_VARIANT, default_bundle, 100.0),)
    named: list[tuple[str, Path, float | None]] = []
    for entry in entries:
        name, eq, rest = entry.partition("=")
        name = name.strip()
        if not eq or not rest.strip():
            raise ValueError(f"variants: {entry!r} must be name=path[:percent]")
        if not NAME.match(name) or name == SHADOW:
            raise ValueError(
                f"variants: name {name!r} must be 1-32 of a-z, 0-9, _ and -, start with a "
                f"letter, and not be {SHADOW!r}"
            )
        path, percent = rest.strip(), None
        head, colon, tail = path.rpartition(":")
        if colon and head:
            try:
                percent = float(tail)
            except ValueError:
                percent = None  # a colon inside the path
            else:
                path = head
                if not 0 < percent <= 100:
                    raise ValueError(f"variants: {name}'s percent must be in (0, 100], got {tail}")
        named.append((name, Path(path).expanduser(), percent))
    names = [n for n, _, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"variants: names must be unique, got {', '.join(names)}")
    given = sum(p for _, _, p in named if p is not None)
    rest_of = [n for n, _, p in named if p is None]
    if given > 100 + 1e-9 or (not rest_of and abs(given - 100) > 1e-9):
        raise ValueError(
            f"variants: the percents sum to {given:g}; they must sum to 100, or to less with "
            f"at least one entry without a percent taking the rest"
        )
    share = (100 - given) / len(rest_of) if rest_of else 0.0
    if rest_of and share <= 0:
        raise ValueError(f"variants: nothing is left for {', '.join(rest_of)}")
    return tuple(VariantSpec(n, b, share if p is None else p) for n, b, p in named)


class VariantSplit:
    """Which variant serves a member: a salted hash of the user id into ``BUCKETS``
    buckets, each variant owning a run of them in the order given."""

    def __init__(self, specs: tuple[VariantSpec, ...], salt: str) -> None:
        # imported here: app.serving.config imports this module, and must not load numpy
        # (the benchmarks set its thread count first)
        from app.core.context import UNKNOWN_USER, clean_user_id

        self._clean, self._logged_out = clean_user_id, UNKNOWN_USER
        self.names = tuple(s.name for s in specs)
        self._salt = salt.encode() + b"\x00"
        total, self._bounds = 0.0, []
        for spec in specs:
            total += spec.percent
            self._bounds.append(round(total * BUCKETS / 100))
        self._bounds[-1] = BUCKETS

    def bucket(self, user_id: str) -> int:
        digest = hashlib.blake2b(self._salt + user_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % BUCKETS

    def assign(self, user_id: str | None) -> str:
        """The member's variant (the id as ``clean_user_id`` keys it, so ``" u42 "`` is
        ``u42``); logged out: the champion (the first)."""
        if len(self.names) == 1:  # one variant (the default): nothing to hash
            return self.names[0]
        member = self._clean(user_id)
        if member == self._logged_out:
            return self.names[0]
        return self.names[bisect.bisect_right(self._bounds, self.bucket(member))]
