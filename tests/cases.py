"""The one table of test cases and tolerances: ops × shapes × layouts × dtypes × modes.

Every test file builds its calls from here (``Call``, ``make_call``, ``arrange``) and compares with
``assert_close``, whose tolerances come from ``TOL`` (keyed by the dtype of the array compared) or from
the few named tolerances below — nowhere else.
"""
from dataclasses import dataclass

import numpy as np

import fastnorm
from fastnorm import _plan, reference

DTYPES = (np.float16, np.float32, np.float64)


# ---------------------------------------------------------------- tolerances (the one table)

@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


# fastnorm and the reference both compute in float64 from the same input values (float16 through
# float32, exactly), so they differ by the final rounding to the output dtype plus float64 summation
# order.  Measured on the main grid: float16 y/dx ≤ 1 ulp; float32 y, dweight, dbias bitwise equal and
# dx ≤ 1 ulp; float64 y ≤ 9e-15, dweight/dbias ≤ 6e-14 absolute, dx ≤ 8e-13 — the last in rms_norm over
# a single element, where dx = dy·rstd·(1 − x̂²) cancels and both sides err by ~1e-16·|dy|/|x|; the
# float64 atol leaves that ill-conditioned case a factor 10.
TOL = {
    np.dtype(np.float16): Tol(atol=1e-3, rtol=2e-3),
    np.dtype(np.float32): Tol(atol=1e-6, rtol=1e-6),
    np.dtype(np.float64): Tol(atol=1e-11, rtol=1e-10),
}

# Central differences in float64 with step FD_STEP: truncation ~h²·|f'''| ≈ 1e-12, rounding
# ~1e-16·Σ|y·r|/h ≈ 1e-8 on the tiny shapes used.
FD_STEP = 1e-6
FD_TOL = Tol(atol=1e-6, rtol=1e-5)

# semantics.md / issue 3: float32 input at an offset of 1e6 gives y within 1e-5 of the float64 reference.
OFFSET = 1e6
OFFSET_TOL = Tol(atol=1e-5, rtol=0.0)

# issue 4: Moments merged from two halves equal the moments of the whole to 1e-12 relative.
MERGE_TOL = Tol(atol=0.0, rtol=1e-12)
# Data at an offset of 1e6 (std 1) loses more: the float64 chunk means carry ~1e-10 absolute error,
# which Chan's δ²·n_a·n_b/n term turns into m2 errors of ~2e-11 relative — measured for the merged
# *and* the whole-batch moments alike against an exact shifted computation (offset 1e8: ~2e-9).
MERGE_OFFSET = 1e6
MERGE_OFFSET_TOL = Tol(atol=0.0, rtol=1e-9)

# Two float64 computations that should agree to a few roundings (identities, oracle vs PyTorch).
ROUNDING = TOL[np.dtype(np.float64)]


def tol_for(dtype):
    return TOL[np.dtype(dtype)]


def assert_close(actual, expected, tol=None, what=""):
    """|actual − expected| ≤ atol + rtol·|expected| elementwise (NaN where expected is NaN), same shape.

    ``tol`` defaults to the table entry of ``actual``'s dtype.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tol = tol_for(actual.dtype) if tol is None else tol
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=tol.rtol,
                               atol=tol.atol, equal_nan=True, err_msg=what)


def assert_bitwise(actual, expected, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.tobytes() != expected.tobytes():
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        raise AssertionError(f"{what}: not bitwise equal; {np.count_nonzero(diff)} elements differ, "
                             f"max |diff| = {np.nanmax(diff)}")


# PyTorch's error texts (torch.nn.functional 2.13, the size printed as a tuple rather than
# torch.Size([…]); test_torch.py checks them against PyTorch itself)
BN_ONE_VALUE = "Expected more than 1 value per channel when training, got input size {}"
IN_ONE_ELEMENT = "Expected more than 1 spatial element when training, got input size {}"
GN_DIVISIBLE = ("Expected number of channels in input to be divisible by num_groups, but got input of shape "
                "{} and num_groups={}")


# ---------------------------------------------------------------- ops

@dataclass(frozen=True)
class Op:
    name: str
    kind: str            # "channel": axis= and (C,) weight;  "row": normalized_shape
    min_ndim: int
    has_bias: bool
    modes: tuple         # names in MODES


OPS = {
    "batch_norm": Op("batch_norm", "channel", 2, True, ("train", "train_nostats", "eval", "eval_nostats")),
    "batch_renorm": Op("batch_renorm", "channel", 2, True, ("train", "train_clip", "eval")),
    "instance_norm": Op("instance_norm", "channel", 3, True, ("train", "train_nostats", "eval")),
    "group_norm": Op("group_norm", "channel", 2, True, ("train",)),
    "layer_norm": Op("layer_norm", "row", 1, True, ("train",)),
    "rms_norm": Op("rms_norm", "row", 1, False, ("train",)),
}
CHANNEL_OPS = tuple(k for k, v in OPS.items() if v.kind == "channel")
ROW_OPS = tuple(k for k, v in OPS.items() if v.kind == "row")
RUNNING_OPS = ("batch_norm", "batch_renorm", "instance_norm")

# mode → (uses batch statistics, passes running stats, extra keyword arguments)
MODES = {
    "batch_norm": {"train": (True, True, dict(training=True)),
                   "train_nostats": (True, False, dict(training=True)),
                   "eval": (False, True, dict(training=False)),
                   "eval_nostats": (True, False, dict(training=False))},   # no buffers: batch stats
    "batch_renorm": {"train": (True, True, dict(training=True)),
                     "train_clip": (True, True, dict(training=True, rmax=1.2, dmax=0.1)),
                     "eval": (False, True, dict(training=False))},
    "instance_norm": {"train": (True, True, dict(use_input_stats=True)),
                      "train_nostats": (True, False, dict(use_input_stats=True)),
                      "eval": (False, True, dict(use_input_stats=False))},
    "group_norm": {"train": (True, False, {})},
    "layer_norm": {"train": (True, False, {})},
    "rms_norm": {"train": (True, False, {})},
}


def batch_stats(op, mode):
    return MODES[op][mode][0]


# ---------------------------------------------------------------- shapes and layouts

# Logical channels-first shapes (N, C, spatial…), ranks 2–5, built from the odd sizes 1, 3, 17, 129
# (9 = 3·3 so group norm has a group count strictly between 1 and C).  Small: ≤ 6579 elements.
SHAPES = (
    (17, 3), (3, 129),
    (3, 17, 129), (1, 3, 17), (17, 9, 1),
    (3, 3, 17, 1), (2, 129, 3, 3),
    (2, 3, 1, 17, 3), (3, 1, 3, 3, 17),
)

# How a logical channels-first array is laid out in memory and which axis is passed:
#   first      C-contiguous (N, C, …), axis=1
#   last       C-contiguous (N, …, C), axis=-1
#   last_view  channels-last memory seen as (N, C, …) through a transposed view, axis=1 (torch channels_last)
#   middle     C-contiguous (N, S0, C, …), axis=2 (rank ≥ 4)
#   strided    (N, C, …) every other element of a larger array (non-contiguous)
#   flipped    (N, C, …) with negative strides on every axis
#   fortran    Fortran order (row ops)
CHANNEL_LAYOUTS = ("first", "last", "last_view", "middle", "strided", "flipped")
ROW_LAYOUTS = ("first", "fortran", "strided", "flipped")


def layouts_for(op, ndim):
    if OPS[op].kind == "row":
        return ROW_LAYOUTS
    return tuple(lay for lay in CHANNEL_LAYOUTS if lay != "middle" or ndim >= 4)


def arrange(v, layout):
    """Logical channels-first values ``v`` → ``(x, axis)`` holding the same values in ``layout``.

    ``x`` is ``np.moveaxis(v, 1, axis)`` element for element; only its memory layout differs.
    """
    if layout == "first":
        return np.ascontiguousarray(v), 1
    if layout == "last":
        return np.ascontiguousarray(np.moveaxis(v, 1, -1)), -1
    if layout == "last_view":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(v, 1, -1)), -1, 1), 1
    if layout == "middle":
        return np.ascontiguousarray(np.moveaxis(v, 1, 2)), 2
    if layout == "strided":
        base = np.zeros(v.shape[:-1] + (2 * v.shape[-1],), v.dtype)
        base[..., ::2] = v
        return base[..., ::2], 1
    if layout == "flipped":
        return np.flip(np.ascontiguousarray(np.flip(v))), 1
    if layout == "fortran":
        return np.asfortranarray(v), 1
    raise ValueError(layout)


def group_choices(C):
    """1, a proper divisor when C has one, and C."""
    mid = [g for g in range(2, C) if C % g == 0][:1]
    return tuple(sorted({1, C, *mid}))


def valid(op, shape, mode):
    """Whether the call is legal: training needs more than one value per group."""
    N = shape[0]
    spatial = int(np.prod(shape[2:], dtype=np.int64))
    if op in ("batch_norm", "batch_renorm") and batch_stats(op, mode) and MODES[op][mode][2].get("training"):
        return N * spatial > 1
    if op == "instance_norm":
        return len(shape) >= 3 and (spatial > 1 or not batch_stats(op, mode))
    return True


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple          # logical channels-first shape
    layout: str
    dtype: np.dtype
    mode: str
    groups: int = None    # group norm
    nshape: int = None    # row ops: number of normalized trailing dims

    @property
    def id(self):
        extra = f"-G{self.groups}" if self.groups else (f"-k{self.nshape}" if self.nshape else "")
        return (f"{self.op}-{'x'.join(map(str, self.shape))}-{self.layout}-{np.dtype(self.dtype).name}-"
                f"{self.mode}{extra}")


def grid(ops=tuple(OPS), shapes=SHAPES, dtypes=DTYPES, layouts=None, modes=None):
    """Every legal case of the table (optionally restricted to some ops/shapes/dtypes/layouts/modes)."""
    out = []
    for op in ops:
        for shape in shapes:
            if len(shape) < OPS[op].min_ndim:
                continue
            for layout in layouts_for(op, len(shape)):
                if layouts is not None and layout not in layouts:
                    continue
                for dtype in dtypes:
                    for mode in OPS[op].modes:
                        if modes is not None and mode not in modes:
                            continue
                        if not valid(op, shape, mode):
                            continue
                        if op == "group_norm":
                            extras = [dict(groups=g) for g in group_choices(shape[1])]
                        elif OPS[op].kind == "row":
                            extras = [dict(nshape=k) for k in (1, 2) if k <= len(shape)]
                        else:
                            extras = [{}]
                        for extra in extras:
                            out.append(Case(op, shape, layout, np.dtype(dtype), mode, **extra))
    return out


# ---------------------------------------------------------------- calls

class Call:
    """One op call by keyword (torch's argument names, ``input`` included).

    ``forward`` runs on fresh copies of the running stats, so one Call can be run by fastnorm and by the
    reference (or many times, for finite differences) from the same starting buffers.
    """

    def __init__(self, op, **kwargs):
        self.op, self.kwargs = op, kwargs

    @property
    def x(self):
        return self.kwargs["input"]

    def fresh(self, **override):
        kw = dict(self.kwargs)
        for k in ("running_mean", "running_var"):
            if kw.get(k) is not None:
                kw[k] = kw[k].copy()
        kw.update(override)
        return kw

    def forward(self, module=fastnorm, **override):
        """(y, ctx, kwargs actually used — their running stats hold the updated values)."""
        kw = self.fresh(**override)
        y, ctx = getattr(module, self.op + "_forward")(**kw)
        return y, ctx, kw

    def backward(self, module, dy, ctx):
        return getattr(module, self.op + "_backward")(dy, ctx)

    def __repr__(self):
        desc = {k: (f"array{v.shape}:{v.dtype}" if isinstance(v, np.ndarray) else v) for k, v in self.kwargs.items()}
        return f"Call({self.op}, {desc})"


def param_dtype_for(dtype):
    """Weight/bias/running stats: the input's dtype, float32 for float16 input."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


def make_call(op, x, *, axis=1, mode="train", rng, weight=True, bias=True, param_dtype=None, groups=None,
              nshape=1, **extra):
    """A legal call of ``op`` on ``x`` with random weight/bias/running stats (those asked for)."""
    pdt = param_dtype_for(x.dtype) if param_dtype is None else np.dtype(param_dtype)
    kw = dict(input=x)
    if OPS[op].kind == "row":
        shape = tuple(x.shape[x.ndim - nshape:])
        kw["normalized_shape"] = shape
    else:
        C = x.shape[axis]
        shape = (C,)
        kw["axis"] = axis
        _, running, mode_kw = MODES[op][mode]
        kw.update(mode_kw)
        if op == "group_norm":
            kw["num_groups"] = C if groups is None else groups
        if op in RUNNING_OPS:
            kw["running_mean"] = rng.normal(0.0, 0.5, C).astype(pdt) if running else None
            kw["running_var"] = rng.uniform(0.25, 4.0, C).astype(pdt) if running else None
    kw["weight"] = rng.normal(1.0, 0.5, shape).astype(pdt) if weight else None
    if OPS[op].has_bias:
        kw["bias"] = rng.normal(0.0, 1.0, shape).astype(pdt) if bias else None
    kw.update(extra)
    return Call(op, **kw)


def case_call(case, rng, **kw):
    """The Call of one grid case, on standard-normal data laid out as the case says."""
    x, axis = arrange(rng.standard_normal(case.shape).astype(case.dtype), case.layout)
    if OPS[case.op].kind == "row":
        return make_call(case.op, x, mode=case.mode, rng=rng, nshape=case.nshape, **kw)
    return make_call(case.op, x, axis=axis, mode=case.mode, rng=rng, groups=case.groups, **kw)


def group_index(op, x, axis, groups=None, nshape=1):
    """An integer array of x's shape: which normalization group each element belongs to."""
    if OPS[op].kind == "row":
        rows = int(np.prod(x.shape[:x.ndim - nshape], dtype=np.int64))
        return np.repeat(np.arange(rows), x.size // max(rows, 1)).reshape(x.shape)
    axis = axis % x.ndim
    N, C = x.shape[0], x.shape[axis]
    n = np.arange(N).reshape([N] + [1] * (x.ndim - 1))
    c = np.arange(C).reshape([1] * axis + [C] + [1] * (x.ndim - axis - 1))
    if op in ("batch_norm", "batch_renorm"):
        g = c + 0 * n
    elif op == "instance_norm":
        g = n * C + c
    else:
        G = groups
        g = n * G + c // (C // G)
    return np.broadcast_to(g, x.shape)


# ---------------------------------------------------------------- the comparison every file uses

def _arrays(kwargs):
    return {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}


def check_against_reference(call, rng, dy=None):
    """fastnorm and the reference from the same starting state: y, running stats, dx, dweight, dbias.

    Also checks dtypes/shapes of the results and that no input (x, weight, bias, dy) was modified.
    """
    before = _arrays(call.kwargs)
    x = call.x
    y, ctx, kw = call.forward(fastnorm)
    y_ref, ctx_ref, kw_ref = call.forward(reference)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y_ref, what="y")
    for k in ("running_mean", "running_var"):
        if kw.get(k) is not None:
            assert kw[k].dtype == call.kwargs[k].dtype
            assert_close(kw[k], kw_ref[k], what=k)

    dy = rng.standard_normal(x.shape).astype(x.dtype) if dy is None else dy
    dy_before = dy.copy()
    dx, dweight, dbias = call.backward(fastnorm, dy, ctx)
    dx_ref, dweight_ref, dbias_ref = call.backward(reference, dy, ctx_ref)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert_close(dx, dx_ref, what="dx")
    for name, g, g_ref in (("weight", dweight, dweight_ref), ("bias", dbias, dbias_ref)):
        p = call.kwargs.get(name)
        if p is None:
            assert g is None, f"d{name} must be None when {name} is None"
        else:
            assert g.dtype == p.dtype and g.shape == p.shape, f"d{name}: {g.dtype}{g.shape} vs {p.dtype}{p.shape}"
            assert_close(g, g_ref, what=f"d{name}")

    # inputs are never modified (the running stats the harness passed were copies: see Call.forward)
    for k, v in before.items():
        np.testing.assert_array_equal(call.kwargs[k], v, err_msg=f"{k} was modified")
    np.testing.assert_array_equal(dy, dy_before, err_msg="grad_output was modified")
    return y, kw


# ---------------------------------------------------------------- thread-count determinism

def chunky_calls(dtype):
    """Calls on inputs big enough that every reduction splits into several CHUNK-sized partials."""
    K = _plan.CHUNK
    rng = np.random.default_rng(20240611)
    calls = []

    def add(name, op, shape, layout="first", **kw):
        v = rng.standard_normal(shape).astype(dtype) + 0.5
        x, axis = arrange(v, layout)
        if OPS[op].kind == "row":
            calls.append((name, make_call(op, x, rng=rng, **kw)))
        else:
            calls.append((name, make_call(op, x, axis=axis, rng=rng, **kw)))

    C = 8
    rows = 3 * K // C + 17                                    # column chunk = K // C rows → 4 chunks
    for op in ("batch_norm", "batch_renorm"):
        add(f"{op}-first", op, (2, 3, 2 * K + 5))             # lanes of 3 chunks, merged over N too
        add(f"{op}-last", op, (4, C, rows // 4 + 1), layout="last")
        add(f"{op}-eval-first", op, (2, 3, 2 * K + 5), mode="eval")
        add(f"{op}-eval-last", op, (4, C, rows // 4 + 1), layout="last", mode="eval")
    add("batch_norm-2d", "batch_norm", (rows, C))             # per-activation (N, C): a column reduction
    add("instance_norm-first", "instance_norm", (2, 3, K + 7))
    add("instance_norm-last", "instance_norm", (2, C, rows), layout="last")
    add("instance_norm-eval-last", "instance_norm", (2, C, rows), layout="last", mode="eval")
    add("group_norm-first", "group_norm", (2, 6, K // 2 + 3), groups=3)     # a lane of Cg·S > K
    add("group_norm-last", "group_norm", (2, 6, K // 2 + 3), layout="last", groups=3)
    for op in ("layer_norm", "rms_norm"):
        add(f"{op}-long", op, (3, 2 * K + 5))                 # each row in 3 chunks
        add(f"{op}-many", op, (4 * K // 64 + 3, 64))          # backward: many chunks of rows
        add(f"{op}-2d", op, (K // 128 + 3, 16, 16), nshape=2)
    return calls


def determinism_outputs():
    """name → array for forward (y, running stats) and backward (dx, dweight, dbias) of every op and layout.

    Run in this process and in a ``NUMBA_NUM_THREADS=1`` subprocess; the results must be bitwise equal.
    """
    out = {}
    for dtype in (np.float32, np.float64):
        for name, call in chunky_calls(dtype):
            key = f"{name}-{np.dtype(dtype).name}"
            y, ctx, kw = call.forward(fastnorm)
            dy = np.random.default_rng(7).standard_normal(y.shape).astype(dtype)
            dx, dw, db = call.backward(fastnorm, dy, ctx)
            out[key + "-y"], out[key + "-dx"], out[key + "-dweight"] = y, dx, dw
            if db is not None:
                out[key + "-dbias"] = db
            for k in ("running_mean", "running_var"):
                if kw.get(k) is not None:
                    out[f"{key}-{k}"] = kw[k]
    return out


def save_determinism_outputs(path):
    np.savez(path, **determinism_outputs())


# the grid's ids are used by several files; computed once
GRID = grid()
CASE_IDS = [c.id for c in GRID]


def numeric_grad(loss, a, h=FD_STEP):
    """(loss(a + h·e_i) − loss(a − h·e_i)) / 2h for every element i of ``a`` (perturbed in place)."""
    g = np.empty(a.shape)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + h
        up = loss()
        a[idx] = old - h
        down = loss()
        a[idx] = old
        g[idx] = (up - down) / (2 * h)
    return g
