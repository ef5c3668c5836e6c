"""Tensor-by-tensor comparison of the port against a reference, and the parity report.

Every compared tensor gets (all computed in float64):

* ``max_abs``: ``max |actual - reference|``;
* ``max_rel``: ``max |actual - reference| / max(|reference|, floor)`` with
  ``floor = REL_FLOOR * max(1, max |reference|)`` (so entries that are rounding noise around zero do
  not dominate the relative error);
* ``where``: the index (C order, in the reference's layout) of the largest absolute error, with the
  two values there;
* ``scaled``: ``max |actual - reference| / max(1, max |reference|)``: the project's tolerance measure
  (an absolute error for values of order <= 1, a relative one for large tensors);
* ``verdict``: ``PASS`` when ``scaled <= tol`` for the mode (see :mod:`.modes`). Gradients that are
  mathematically zero (see :func:`is_structurally_zero`) are compared as ``max_abs <= tol * grad_scale``
  (``grad_scale = max(1, largest |gradient| of the case)``), since both sides are rounding noise.
  ``SHAPE`` (shapes differ), ``MISSING`` (the port did not produce a stored tensor) and ``NONFINITE``
  (NaN/Inf at different places) are failures too.

**The accuracy rule.** Where a float64 result ``exact`` of the same computation is available (``live``
computes one by running the *reference* in float64 on the same weights, inputs and cotangent; stored cases
have none and keep the plain rule), a tensor that fails the plain rule (verdict ``FAIL``) still passes
when the port is, element by element, at least as close to float64 as the reference is::

    max_i ( |port_i - exact_i| - |ref_i - exact_i| )  <=  tol * S

with ``S`` the plain rule's scale (``max(1, max |reference|)``, or ``grad_scale`` for a structurally zero
gradient), i.e. the same allowance the plain rule grants. Elementwise, not on the two maxima: a large port
error at one element cannot hide behind a large reference error at another. Such a row has
``rule = "accuracy"``; rows passing ``scaled <= tol`` have ``rule = "plain"``. With ``exact`` every row also
gets ``port_vs_f64 = max |port - exact|`` and ``ref_vs_f64 = max |ref - exact|``;
``reference_less_accurate`` is ``ref_vs_f64 > port_vs_f64``. It is the reference's float64, never the
port's: a port with a semantic slip agrees with its own float64 run, so judging it by that would pass it.

The "first diverging module" is the first failing intermediate in execution order (the order in which
the port's forward hooks fired: a submodule finishes before its parent), else the model output.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "REL_FLOOR",
    "TensorResult",
    "F64Result",
    "Report",
    "compare_tensor",
    "compare_all",
    "is_structurally_zero",
    "grad_module",
]

REL_FLOOR = 1e-3
PASS = "PASS"
FAIL = "FAIL"
SHAPE = "SHAPE"
MISSING = "MISSING"
NONFINITE = "NONFINITE"
#: which rule passed a tensor (see the module docstring)
PLAIN = "plain"
ACCURACY = "accuracy"


@dataclass
class TensorResult:
    """The comparison of one tensor. ``kind``: 'output' | 'intermediate' | 'gradient'."""

    name: str
    kind: str
    module: str
    shape: list[int]
    verdict: str
    tol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    scaled: float = 0.0
    where: list[int] | None = None
    actual_at: float | None = None
    reference_at: float | None = None
    structural_zero: bool = False
    note: str = ""
    #: "plain" | "accuracy" for a passing row, "" for a failing one
    rule: str = ""
    #: with a float64 result: max |port - f64|, max |ref - f64|, max_i(|port_i - f64_i| - |ref_i - f64_i|)
    port_vs_f64: float | None = None
    ref_vs_f64: float | None = None
    excess_vs_f64: float | None = None
    #: the allowance ``tol * S`` both rules grant
    allowance: float | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def reference_less_accurate(self) -> bool:
        """The reference is further from float64 than the port (False without a float64 result)."""
        return self.ref_vs_f64 is not None and self.port_vs_f64 is not None and self.ref_vs_f64 > self.port_vs_f64


def _short_class(scenic_class: str) -> str:
    return scenic_class.rsplit(".", 1)[-1]


def is_structurally_zero(grad_key: str, scenic_class: str, constructor_kwargs: Mapping[str, Any]) -> bool:
    """Gradients that are mathematically zero; their computed values are rounding noise.

    * attention ``key/bias`` (softmax over keys is shift invariant);
    * ``token_masking/Dense_1/bias`` of a TokenLearnerModuleV11 (softmax over positions);
    * ``Dense_0/bias`` of a TokenFuser that normalises (LayerNorm ``fuser_mix_norm2`` removes any shift).
    """
    cls = _short_class(scenic_class)
    if grad_key.endswith("MultiHeadDotProductAttention_0/key/bias"):
        return True
    in_v11 = "TokenLearnerModuleV11" in grad_key or cls == "TokenLearnerModuleV11"
    if in_v11 and grad_key.endswith("token_masking/Dense_1/bias"):
        return True
    # EncoderModFuser's fusers always normalise; a standalone TokenFuser does unless told otherwise.
    normalised_fuser = "TokenFuser" in grad_key or (
        cls == "TokenFuser" and constructor_kwargs.get("use_normalization", True)
    )
    return bool(normalised_fuser and grad_key.endswith("/Dense_0/bias") and "token_masking" not in grad_key)


def grad_module(grad_key: str) -> str:
    """The module a gradient belongs to: ``params/A/B/kernel`` -> ``A/B``; ``input/x`` -> ``input x``."""
    if grad_key.startswith("input/"):
        return "input " + grad_key[len("input/") :]
    path = grad_key[len("params/") :] if grad_key.startswith("params/") else grad_key
    return path.rsplit("/", 1)[0] if "/" in path else "(top level)"


def _f64(a: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    return a.astype(np.float64)


def compare_tensor(
    name: str,
    kind: str,
    module: str,
    actual: Any,
    reference: Any,
    tol: float,
    *,
    abs_scale: float | None = None,
    structural_zero: bool = False,
    exact: Any = None,
) -> TensorResult:
    """Compare one tensor. ``abs_scale`` (with ``structural_zero``): pass when ``max_abs <= tol * abs_scale``.

    ``actual`` may have a different shape with the same number of elements (torch keeps attention heads
    flat); it is then read in C order in the reference's shape. ``exact``: the float64 result of the same
    computation (the reference's shape); enables the accuracy rule (module docstring).
    """
    ref = _f64(reference)
    res = TensorResult(name, kind, module, list(ref.shape), PASS, tol, structural_zero=structural_zero)
    if actual is None:
        res.verdict = MISSING
        res.note = "not produced by the port"
        return res
    act = _f64(actual)
    if act.shape != ref.shape:
        if act.size != ref.size:
            res.verdict = SHAPE
            res.note = f"port shape {list(act.shape)} != reference shape {list(ref.shape)}"
            return res
        act = act.reshape(ref.shape)
    if ref.size == 0:
        res.rule = PLAIN
        return res
    fin_a, fin_r = np.isfinite(act), np.isfinite(ref)
    if not (fin_a.all() and fin_r.all()):
        same = (np.isnan(act) & np.isnan(ref)) | ((act == ref) & ~fin_r)
        bad = ~(fin_a & fin_r) & ~same
        if bad.any():
            idx = np.unravel_index(int(np.argmax(bad)), ref.shape)
            res.verdict = NONFINITE
            res.where = [int(i) for i in idx]
            res.actual_at, res.reference_at = float(act[idx]), float(ref[idx])
            res.max_abs = res.max_rel = res.scaled = math.inf
            res.note = f"{int(bad.sum())} non-finite value(s) differ"
            return res
        act = np.where(same, 0.0, act)
        ref = np.where(same, 0.0, ref)
    diff = np.abs(act - ref)
    flat = int(np.argmax(diff))
    idx = np.unravel_index(flat, ref.shape)
    ref_max = float(np.abs(ref).max())
    scale = max(1.0, ref_max)
    floor = REL_FLOOR * scale
    res.max_abs = float(diff[idx])
    res.max_rel = float((diff / np.maximum(np.abs(ref), floor)).max())
    res.scaled = res.max_abs / scale
    res.where = [int(i) for i in idx]
    res.actual_at, res.reference_at = float(act[idx]), float(ref[idx])
    if structural_zero and abs_scale is not None:
        res.note = f"structurally zero: |diff| <= tol * grad scale {abs_scale:.3g}"
        res.allowance = tol * abs_scale
        ok = res.max_abs <= res.allowance
    else:
        res.allowance = tol * scale
        ok = res.scaled <= tol
    if exact is not None:
        _against_f64(res, act, ref, exact)
    if ok:
        res.verdict, res.rule = PASS, PLAIN
    elif res.excess_vs_f64 is not None and res.excess_vs_f64 <= res.allowance:
        res.verdict, res.rule = PASS, ACCURACY
    else:
        res.verdict = FAIL
    return res


def _against_f64(res: TensorResult, act: np.ndarray, ref: np.ndarray, exact: Any) -> None:
    """Fill the float64 distances of ``res`` (left None when ``exact`` does not fit or is not finite)."""
    ex = _f64(exact)
    if ex.size != ref.size or not np.isfinite(ex).all():
        return
    ex = ex.reshape(ref.shape)
    d_port, d_ref = np.abs(act - ex), np.abs(ref - ex)
    res.port_vs_f64 = float(d_port.max())
    res.ref_vs_f64 = float(d_ref.max())
    res.excess_vs_f64 = float((d_port - d_ref).max())


@dataclass
class F64Result:
    """A float64 run of the reference on the same weights, inputs and cotangent (keys as the reference's)."""

    out: Any
    intermediates: Mapping[str, Any]
    grads: Mapping[str, Any]


def compare_all(
    *,
    actual_out: Any,
    reference_out: Any,
    actual_inter: Mapping[str, Any],
    reference_inter: Mapping[str, Any],
    inter_order: Sequence[str],
    actual_grads: Mapping[str, Any] | None,
    reference_grads: Mapping[str, Any] | None,
    tol: float,
    scenic_class: str,
    constructor_kwargs: Mapping[str, Any],
    grad_tol: float | None = None,
    exact: F64Result | None = None,
) -> list[TensorResult]:
    """Compare the output, every reference intermediate (in execution order) and every reference gradient.

    ``exact``: the float64 result of the same computation, for the accuracy rule (module docstring)."""
    ex = exact or F64Result(None, {}, {})
    rows = [compare_tensor("out", "output", "(model output)", actual_out, reference_out, tol, exact=ex.out)]

    order = {k: i for i, k in enumerate(inter_order)}
    keys = sorted(reference_inter, key=lambda k: (order.get(_base_key(k), len(order)), k))
    for key in keys:
        rows.append(
            compare_tensor(
                f"inter/{key}", "intermediate", key, actual_inter.get(_base_key(key)), reference_inter[key], tol,
                exact=ex.intermediates.get(key),
            )
        )

    if reference_grads:
        gtol = tol if grad_tol is None else grad_tol
        actual_grads = actual_grads or {}
        finite = [np.abs(_f64(v)).max() for v in reference_grads.values() if np.size(v)]
        gscale = max([1.0] + [float(v) for v in finite if np.isfinite(v)])
        for key in sorted(reference_grads):
            sz = is_structurally_zero(key, scenic_class, constructor_kwargs)
            rows.append(
                compare_tensor(
                    key,
                    "gradient",
                    grad_module(key),
                    actual_grads.get(key),
                    reference_grads[key],
                    gtol,
                    abs_scale=gscale,
                    structural_zero=sz,
                    exact=ex.grads.get(key),
                )
            )
        for key in sorted(set(actual_grads) - set(reference_grads)):
            rows.append(
                TensorResult(key, "gradient", grad_module(key), [], MISSING, gtol, note="no reference gradient")
            )
    return rows


def _base_key(key: str) -> str:
    """Flax records a module called twice as ``key[0]``, ``key[1]``; the port keeps the first call."""
    return key[:-3] if key.endswith("[0]") else key


@dataclass
class Report:
    """A parity report: every compared tensor, a verdict and the first diverging module."""

    subject: str
    mode: str
    device: str
    reference: str
    tol: float
    rows: list[TensorResult]
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    #: the accuracy rule: "applied" (a float64 reference result was computed and every row carries its
    #: distances), "not needed" (every tensor passed the plain rule; no float64 run), "unavailable" (a
    #: stored case, mode f64, or turned off: the plain rule alone)
    accuracy: str = "unavailable"

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def failures(self) -> list[TensorResult]:
        return [r for r in self.rows if not r.passed]

    @property
    def passed_by_accuracy(self) -> list[TensorResult]:
        """Tensors that failed the plain rule and passed the accuracy rule."""
        return [r for r in self.rows if r.passed and r.rule == ACCURACY]

    @property
    def reference_less_accurate(self) -> list[TensorResult]:
        """Tensors where the reference is further from float64 than the port (needs the float64 run)."""
        return [r for r in self.rows if r.reference_less_accurate]

    @property
    def first_divergence(self) -> TensorResult | None:
        """The first failing intermediate in execution order; else the output; else the first failing
        gradient; None when everything passes."""
        for kind in ("intermediate", "output", "gradient"):
            for r in self.rows:
                if r.kind == kind and not r.passed:
                    return r
        return None

    def worst(self, kind: str) -> TensorResult | None:
        rows = [r for r in self.rows if r.kind == kind]
        return max(rows, key=lambda r: (not r.passed, r.scaled)) if rows else None

    def max_error(self, kind: str | None = None, *, structural: bool = False) -> float:
        """The largest scaled error over the rows of ``kind`` (all kinds when None); structurally zero
        gradients are left out unless ``structural``."""
        vals = [
            r.scaled
            for r in self.rows
            if (kind is None or r.kind == kind) and (structural or not r.structural_zero)
        ]
        return max(vals, default=0.0)

    # ------------------------------------------------------------------------------------------------
    def summary(self) -> str:
        n = len(self.rows)
        if self.passed:
            by_acc = self.passed_by_accuracy
            how = (
                f"{n} tensors: {n - len(by_acc)} within tol {self.tol:g} (plain rule), {len(by_acc)} as close to "
                f"float64 as the reference (accuracy rule: {_names(by_acc, 3)})"
                if by_acc
                else f"{n} tensors within tol {self.tol:g}"
            )
            return (
                f"PASS: {how} (mode {self.mode}, {self.device}); "
                f"max scaled error: output {self.max_error('output'):.3g}, "
                f"intermediates {self.max_error('intermediate'):.3g}, gradients {self.max_error('gradient'):.3g}"
            )
        first = self.first_divergence
        assert first is not None
        return (
            f"FAIL: {len(self.failures)} of {n} tensors differ (mode {self.mode}, {self.device}, tol {self.tol:g}); "
            f"first diverging module: {first.module} (tensor {first.name}: {first.verdict}, "
            f"{_describe(first)})"
        )

    def accuracy_line(self) -> str:
        """How the verdict was reached, in one line."""
        plain = "rules: plain (scaled error <= tol)"
        if self.accuracy == "applied":
            return (f"{plain}, else accuracy (elementwise |port - f64| <= |ref - f64| + tol * scale; f64: the "
                    "reference run in float64 on the same weights and inputs)")
        if self.accuracy == "not needed":
            return f"{plain}; every tensor passed it, so no float64 reference run was needed"
        return f"{plain}; no float64 result here (stored case, mode f64 or accuracy off), so no accuracy rule"

    def to_text(self, *, verbose: bool = False, max_rows: int = 40) -> str:
        """A readable table. Without ``verbose`` passing rows are elided after ``max_rows``, failures never."""
        lines = [
            f"tokenlearner-parity report: {self.subject}",
            f"reference: {self.reference}",
            f"mode: {self.mode}  device: {self.device}  tolerance: scaled error <= {self.tol:g}",
            self.accuracy_line(),
        ]
        if self.settings:
            lines.append("precision: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        lines += [f"note: {n}" for n in self.notes]
        f64 = self.accuracy == "applied"
        header = f"{'verdict':<9} {'rule':<8} {'max_abs':>9} {'max_rel':>9} {'scaled':>9}"
        if f64:
            header += f" {'port-f64':>9} {'ref-f64':>9}"
        header += f"  {'where':<16} tensor"
        lines += ["", header, "-" * len(header)]
        shown = 0
        elided = 0
        for r in self.rows:
            if not verbose and r.passed and r.rule != ACCURACY and shown >= max_rows:
                elided += 1
                continue
            shown += 1
            where = "" if r.where is None else "[" + ",".join(map(str, r.where)) + "]"
            tag = " (structural zero)" if r.structural_zero else ""
            if r.reference_less_accurate and (r.rule == ACCURACY or not r.passed):
                tag += " (reference less accurate)"
            extra = f"  -- {r.note}" if r.note and not r.passed else ""
            line = f"{r.verdict:<9} {r.rule or '-':<8} {_num(r.max_abs):>9} {_num(r.max_rel):>9} {_num(r.scaled):>9}"
            if f64:
                line += f" {_num(r.port_vs_f64):>9} {_num(r.ref_vs_f64):>9}"
            lines.append(f"{line}  {where:<16} {r.name}{tag}{extra}")
        if elided:
            lines.append(f"... {elided} more passing tensors (use --verbose to list them)")
        worse = self.reference_less_accurate
        if worse:
            lines += ["", f"reference less accurate than the port (max|ref - f64| > max|port - f64|) on "
                          f"{len(worse)} of {len(self.rows)} tensors: {_names(worse, 8)}"]
        lines += ["", self.summary()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "subject": self.subject,
            "passed": self.passed,
            "mode": self.mode,
            "device": self.device,
            "reference": self.reference,
            "tolerance": self.tol,
            "accuracy_rule": self.accuracy,
            "settings": self.settings,
            "notes": self.notes,
            "summary": self.summary(),
            "first_diverging_module": None if first is None else first.module,
            "first_diverging_tensor": None if first is None else first.name,
            "max_scaled_error": {
                k: self.max_error(k) for k in ("output", "intermediate", "gradient")
            },
            "counts": {
                "tensors": len(self.rows),
                "failed": len(self.failures),
                "passed_plain": sum(r.passed and r.rule == PLAIN for r in self.rows),
                "passed_accuracy": len(self.passed_by_accuracy),
            },
            "passed_by_accuracy_rule": [r.name for r in self.passed_by_accuracy],
            "reference_less_accurate": [r.name for r in self.reference_less_accurate],
            "tensors": [_row_dict(r) for r in self.rows],
        }

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False, default=str)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text + "\n")
        return text

    def __str__(self) -> str:
        return self.to_text()


def _names(rows: Sequence[TensorResult], limit: int = 5) -> str:
    names = [r.name for r in rows[:limit]]
    return ", ".join(names) + (f" (+{len(rows) - limit} more)" if len(rows) > limit else "")


def _row_dict(r: TensorResult) -> dict[str, Any]:
    d = asdict(r)
    d["reference_less_accurate"] = r.reference_less_accurate
    for k in ("max_abs", "max_rel", "scaled", "actual_at", "reference_at", "port_vs_f64", "ref_vs_f64",
              "excess_vs_f64", "allowance"):
        v = d[k]
        if isinstance(v, float) and not math.isfinite(v):
            d[k] = str(v)
    return d


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "inf"
    return f"{v:.2e}"


def _describe(r: TensorResult) -> str:
    if r.verdict in (MISSING, SHAPE):
        return r.note
    where = "" if r.where is None else "[" + ",".join(map(str, r.where)) + "]"
    if r.actual_at is None:
        return r.note
    text = (
        f"max abs {_num(r.max_abs)} at {where} (port {r.actual_at:.6g} vs reference {r.reference_at:.6g}), "
        f"scaled {_num(r.scaled)} > tol {r.tol:g}"
    )
    if r.excess_vs_f64 is not None:
        text += (
            f"; vs float64: port {_num(r.port_vs_f64)}, reference {_num(r.ref_vs_f64)}, port exceeds the "
            f"reference's error by {_num(r.excess_vs_f64)} > allowance {_num(r.allowance)}"
        )
    return text


def iter_failures(reports: Iterable[Report]) -> Iterable[TensorResult]:
    for rep in reports:
        yield from rep.failures
