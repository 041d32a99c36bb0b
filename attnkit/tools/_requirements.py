"""Audit requirements: what a kernel module asserts about its compiled variants (the CI audit
checks them). Pure Python (no Triton import), so the judging logic is testable on its own.

A kernel module under ``attnkit/ops`` may declare, at module level::

    AUDIT_REQUIREMENTS = [
        dict(kernel=r"^_attention_fwd_kernel$", arch="sm_90", dtypes=("bfloat16",), head_dims=(64, 128),
             max_spill_stores=0, mma="wgmma", why="issue 12: ..."),
    ]

Keys (``kernel`` and ``why`` required, and at least one check):

* ``kernel``: regex searched in the kernel (JIT function) name;
* ``arch``: an arch name or a tuple of them (default: every audited arch);
* ``dtypes``: input dtype names (``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``,
  ``"float32"``/``"fp32"``; default: any);
* ``head_dims``: head dims (default: any);
* ``case``: regex searched in the names of the calls that reach a variant (``gpu_audit --list``),
  e.g. ``r"norm=rms"`` (default: any call);
* checks: ``max_spill_stores`` (int: spill-store bytes per thread at most), ``mma`` (the MMA kind
  every matched variant must have: ``"wgmma"``, ``"mma.sync"``, ``"none"``), ``same_mma_count_as``
  (regex on call names: every matched variant must have the same number of MMA instructions in
  its PTX, wgmma and mma.sync counted apart, as the variant of the same kernel, arch, dtype, head
  dim and config reached by a call matching it);
* ``why``: the reason (an issue), printed with a violation.

A matched variant that failed to compile violates every check. Coverage: each (arch, dtype, head
dim) combination a requirement names must be matched by at least one audited variant, or the
requirement fails (it cannot pass vacuously) -- in a narrowed run only where the run could have
matched it (:func:`in_scope`).
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
import re
from dataclasses import dataclass
from typing import Any

_DTYPE_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
                "float32": "fp32", "fp32": "fp32", "float": "fp32"}
_MMA_KINDS = ("wgmma", "mma.sync", "mixed", "none")
_KEYS = {"kernel", "arch", "dtypes", "head_dims", "case", "max_spill_stores", "mma", "same_mma_count_as", "why"}
_CHECKS = ("max_spill_stores", "mma", "same_mma_count_as")


@dataclass(frozen=True)
class Requirement:
    source: str                      # "module[index]"
    kernel: str
    archs: tuple[str, ...] | None
    dtypes: tuple[str, ...] | None   # short names (bf16, fp16, fp32)
    head_dims: tuple[int, ...] | None
    case: str | None
    max_spill_stores: int | None
    mma: str | None
    same_mma_count_as: str | None
    why: str

    def label(self) -> str:
        parts = [self.kernel]
        if self.case:
            parts.append(f"case~{self.case}")
        return " ".join(parts)

    def checks(self) -> str:
        out = []
        if self.max_spill_stores is not None:
            out.append(f"spill<={self.max_spill_stores}")
        if self.mma is not None:
            out.append(f"mma={self.mma}")
        if self.same_mma_count_as is not None:
            out.append(f"mma count = case~{self.same_mma_count_as}")
        return ", ".join(out)

    def matches(self, row: dict[str, Any]) -> bool:
        """Whether an audit variant row (``gpu_audit`` JSON ``variants`` entry) is one this
        requirement is about."""
        if not re.search(self.kernel, row["kernel"]):
            return False
        if self.archs is not None and row["arch"] not in self.archs:
            return False
        if self.dtypes is not None and row["dtype"] not in self.dtypes:
            return False
        if self.head_dims is not None and row["head_dim"] not in self.head_dims:
            return False
        if self.case is not None and not any(re.search(self.case, c) for c in row.get("cases") or [row["case"]]):
            return False
        return True


def _tuple(value, name: str, source: str, kind) -> tuple | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, (str, int)) else tuple(value)
    if not items or not all(isinstance(x, kind) and not isinstance(x, bool) for x in items):
        raise ValueError(f"{source}: {name} must be a {kind.__name__} or a non-empty tuple of them, got {value!r}")
    return items


def parse_requirement(spec: dict[str, Any], source: str, known_archs=None) -> Requirement:
    """Validate one ``AUDIT_REQUIREMENTS`` entry; raises ValueError naming `source` and the key."""
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: a requirement must be a dict, got {type(spec).__name__}")
    unknown = set(spec) - _KEYS
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    kernel = spec.get("kernel")
    if not isinstance(kernel, str) or not kernel:
        raise ValueError(f"{source}: kernel must be a non-empty regex string, got {kernel!r}")
    for key in ("kernel", "case", "same_mma_count_as"):
        if spec.get(key) is not None:
            if not isinstance(spec[key], str):
                raise ValueError(f"{source}: {key} must be a regex string, got {spec[key]!r}")
            try:
                re.compile(spec[key])
            except re.error as e:
                raise ValueError(f"{source}: {key} is not a valid regex ({e}): {spec[key]!r}") from None
    why = spec.get("why")
    if not isinstance(why, str) or not why.strip():
        raise ValueError(f"{source}: why must say why the requirement exists (an issue), got {why!r}")
    if not any(spec.get(k) is not None for k in _CHECKS):
        raise ValueError(f"{source}: a requirement must check something: one of {list(_CHECKS)}")
    archs = _tuple(spec.get("arch"), "arch", source, str)
    if archs is not None and known_archs is not None:
        bad = [a for a in archs if a not in known_archs]
        if bad:
            raise ValueError(f"{source}: arch {bad} is not one of {sorted(known_archs)}")
    dtypes = _tuple(spec.get("dtypes"), "dtypes", source, str)
    if dtypes is not None:
        bad = [d for d in dtypes if d not in _DTYPE_NAMES]
        if bad:
            raise ValueError(f"{source}: dtypes {bad} not among {sorted(_DTYPE_NAMES)}")
        dtypes = tuple(dict.fromkeys(_DTYPE_NAMES[d] for d in dtypes))
    head_dims = _tuple(spec.get("head_dims"), "head_dims", source, int)
    spill = spec.get("max_spill_stores")
    if spill is not None and (not isinstance(spill, int) or isinstance(spill, bool) or spill < 0):
        raise ValueError(f"{source}: max_spill_stores must be an int >= 0, got {spill!r}")
    mma = spec.get("mma")
    if mma is not None and mma not in _MMA_KINDS:
        raise ValueError(f"{source}: mma must be one of {list(_MMA_KINDS)}, got {mma!r}")
    return Requirement(source, kernel, archs, dtypes, head_dims, spec.get("case"), spill, mma,
                       spec.get("same_mma_count_as"), why.strip())


def collect(package: str = "attnkit.ops", modules: list[str] | None = None,
            known_archs=None) -> tuple[list[Requirement], list[dict[str, Any]]]:
    """Imports every module under `package` (or exactly `modules`) and parses their
    ``AUDIT_REQUIREMENTS``. Returns (requirements, errors); an error is an import failure or an
    invalid entry (each a failure of the audit)."""
    if modules is None:
        pkg = importlib.import_module(package)
        modules = [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
    reqs: list[Requirement] = []
    errors: list[dict[str, Any]] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported as a failure
            errors.append(dict(case="requirements", error=f"importing {name}: {type(e).__name__}: {e}"[:400]))
            continue
        specs = getattr(mod, "AUDIT_REQUIREMENTS", None)
        if specs is None:
            continue
        if not isinstance(specs, (list, tuple)):
            errors.append(dict(case="requirements", error=f"{name}.AUDIT_REQUIREMENTS must be a list, got "
                                                         f"{type(specs).__name__}"))
            continue
        for i, spec in enumerate(specs):
            try:
                reqs.append(parse_requirement(spec, f"{name}[{i}]", known_archs))
            except ValueError as e:
                errors.append(dict(case="requirements", error=str(e)[:400]))
    return reqs, errors


@dataclass
class Scope:
    """What a run audited, for the coverage rule: the archs, whether it was narrowed, the
    `--kernel` regex, and every recorded launch before the `--kernel` filter as
    (arch, kernel, dtype, head dim, call name) tuples."""

    archs: list[str]
    narrowed_calls: bool = False          # --op or --case
    kernel_filter: str | None = None      # --kernel
    launched: frozenset = frozenset()


def in_scope(req: Requirement, arch: str, dtype: str | None, head_dim: int | None, scope: Scope) -> bool:
    """Whether the run must cover the combination (arch, dtype, head dim) of `req`:

    * its arch is audited in this run, and
    * with ``--kernel``: the run's calls launch a kernel that both the ``--kernel`` regex and
      the requirement's regex match (a requirement about a kernel the filter excludes is out of
      scope), and
    * with ``--op``/``--case``: one of the narrowed calls with that dtype and head dim (and whose
      name the requirement's ``case`` regex matches) launches a kernel the requirement's regex
      matches.

    An un-narrowed run (the CI audit) therefore covers every combination of every requirement
    whose arch it audits."""
    if arch not in scope.archs:
        return False
    if scope.kernel_filter is not None:
        names = {x[1] for x in scope.launched}
        if not any(re.search(scope.kernel_filter, k) and re.search(req.kernel, k) for k in names):
            return False
    if scope.narrowed_calls:
        if not any(a == arch and re.search(req.kernel, k) and (dtype is None or dt == dtype)
                   and (head_dim is None or d == head_dim) and (req.case is None or re.search(req.case, name))
                   for (a, k, dt, d, name) in scope.launched):
            return False
    return True


def _mma_counts(row: dict[str, Any]) -> tuple[int, int]:
    return (row.get("wgmma") or 0, row.get("mma_sync") or 0)


def check(requirements: list[Requirement], rows: list[dict[str, Any]],
          scope: Scope) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Judge audit variant rows against the requirements. Returns (table, failures): one table row
    per requirement (matched variants, worst spill, MMA kinds, status) and one failure per
    violating variant or uncovered combination."""
    table: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for req in requirements:
        matched = [r for r in rows if req.matches(r)]
        violations: list[str] = []
        for r in matched:
            where = dict(case=r["case"], kernel=r["kernel"], arch=r["arch"], config=r["config"])
            problems = []
            if r.get("error"):
                problems.append("did not compile")
            else:
                if req.max_spill_stores is not None and (r.get("spill_stores") or 0) > req.max_spill_stores:
                    problems.append(f"spills {r['spill_stores']} B > {req.max_spill_stores} B")
                if req.mma is not None and r.get("mma") != req.mma:
                    problems.append(f"mma {r.get('mma')} != {req.mma}")
                if req.same_mma_count_as is not None:
                    peers = [p for p in rows if p is not r and p["kernel"] == r["kernel"] and p["arch"] == r["arch"]
                             and p["dtype"] == r["dtype"] and p["head_dim"] == r["head_dim"]
                             and p["config"] == r["config"] and not p.get("error")
                             and any(re.search(req.same_mma_count_as, c) for c in p.get("cases") or [p["case"]])]
                    if not peers:
                        problems.append(f"no variant of a call matching {req.same_mma_count_as!r} with the same "
                                        f"config to compare MMA counts with")
                    elif any(_mma_counts(p) != _mma_counts(r) for p in peers):
                        problems.append(f"MMA instructions (wgmma, mma.sync) {_mma_counts(r)} != "
                                        f"{sorted({_mma_counts(p) for p in peers})} of the {req.same_mma_count_as!r} "
                                        f"calls")
            for p in problems:
                violations.append(p)
                failures.append(dict(where, error=f"requirement {req.source} ({req.checks()}): {p}; why: {req.why}"))
        # coverage: every named (arch, dtype, head dim) combination in scope is matched
        missing = []
        for arch, dtype, hd in itertools.product(req.archs or tuple(scope.archs), req.dtypes or (None,),
                                                 req.head_dims or (None,)):
            if not in_scope(req, arch, dtype, hd, scope):
                continue
            if not any(r["arch"] == arch and (dtype is None or r["dtype"] == dtype)
                       and (hd is None or r["head_dim"] == hd) for r in matched):
                missing.append("/".join(str(x) for x in (arch, dtype, hd) if x is not None))
        for m in missing:
            failures.append(dict(case="requirements", error=f"requirement {req.source} ({req.label()}) matches no "
                                                           f"audited variant for {m}: it cannot pass vacuously "
                                                           f"(add the call to --quick); why: {req.why}"))
        archs_run = [a for a in (req.archs or scope.archs) if a in scope.archs]
        ok = [r for r in matched if not r.get("error")]
        if violations or missing:
            status = "FAIL"
        elif not matched:
            status = "not in this run" if archs_run else f"not audited ({'/'.join(req.archs or ())})"
        else:
            status = "ok"
        table.append(dict(
            requirement=req.source, kernel=req.kernel, case=req.case,
            arch="/".join(req.archs) if req.archs else "any", dtypes="/".join(req.dtypes) if req.dtypes else "any",
            head_dims="/".join(map(str, req.head_dims)) if req.head_dims else "any", checks=req.checks(),
            variants=len(matched), worst_spill=max((r.get("spill_stores") or 0 for r in ok), default=None),
            mma="/".join(sorted({r["mma"] for r in ok if r.get("mma")})) or None,
            mma_counts="/".join(f"{a}+{b}" for a, b in sorted({_mma_counts(r) for r in ok})) or None,
            violations=len(violations), missing=missing, status=status, why=req.why))
    return table, failures
