"""torch.library.opcheck on every op, and the registration facts the rest of the library relies on."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from svdquant_ops import ops
from svdquant_ops.ops import build

from .builders import generator, linear_inputs, op_args

ops.load()  # torch.ops.svdquant.* with their fake kernels
OPS = torch.ops.svdquant


def _linear_args(precision, act_unsigned=False, lead=(3,), N=40, K=128, R=16, requires_grad=False, seed=0):
    """linear's tensor arguments (builders.linear_inputs) in schema order; x, proj_down, proj_up and bias require
    grad if asked."""
    a = linear_inputs(lead, N, K, R, precision, torch.bfloat16, generator(seed), unsigned=act_unsigned)
    if requires_grad:
        for name in ("x", "proj_down", "proj_up", "bias"):
            a[name].requires_grad_(True)
    return op_args("linear", a)


# With inputs that require grad, opcheck's AOT test differentiates the sum of *all* outputs, which these
# inference ops do not support (and the uint8 codes cannot be summed with floats); the AOT dispatch test runs on
# the no-grad variant, the autograd-registration test on the requires-grad one.
GRAD_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _utils(requires_grad):
    return GRAD_UTILS if requires_grad else torch.library._OPCHECK_DEFAULT_UTILS


CONFIGS = [("int4", False, (3,), 0), ("int4", True, (2, 5), 16), ("nvfp4", False, (1,), 32), ("int4", False, (4,), 16),
           ("w4a8", False, (2, 3), 16), ("w4a8", False, (1,), 0)]


@pytest.mark.parametrize("precision,act_unsigned,lead,R", CONFIGS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_quantize_act(precision, act_unsigned, lead, R, requires_grad):
    x, smooth, pd, *_ = _linear_args(precision, act_unsigned, lead=lead, R=R, requires_grad=requires_grad)
    torch.library.opcheck(OPS.quantize_act.default, (x, smooth, pd, precision, act_unsigned),
                          test_utils=_utils(requires_grad))


@pytest.mark.parametrize("lead,R", [((2, 3), 16), ((1,), 0)])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_quantize_act_given_amax(lead, R, requires_grad):
    x, smooth, pd, *_ = _linear_args("w4a8", lead=lead, R=R, requires_grad=requires_grad)
    amax = (x.detach().float() / smooth.float()).abs().amax(-1, keepdim=True)
    torch.library.opcheck(OPS.quantize_act_given_amax.default, (x, smooth, pd, amax),
                          test_utils=_utils(requires_grad))


@pytest.mark.parametrize("precision,act_unsigned,lead,R", CONFIGS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_gemm(precision, act_unsigned, lead, R, requires_grad):
    x, smooth, pd, codes, scales, gsc, up, bias = _linear_args(precision, act_unsigned, lead=lead, R=R)
    act_codes, act_scales, down_act = ops.quantize_act(x, smooth, pd, precision, act_unsigned)
    if requires_grad:
        down_act.requires_grad_(True)
        up.requires_grad_(True)
    args = (act_codes, act_scales, codes, scales, gsc, down_act, up, bias, precision, torch.bfloat16, act_unsigned)
    utils = _utils(requires_grad)
    if precision == "nvfp4":
        # torch's SchemaCheckMode compares inputs before/after with allclose, which has no float8 kernel; the
        # schema (aliasing/mutation) is the same for both precisions and is checked on the int4 cases.
        utils = tuple(u for u in utils if u != "test_schema")
    torch.library.opcheck(OPS.gemm.default, args, test_utils=utils)
    torch.library.opcheck(OPS.gemm.default, args[:7] + (None,) + args[8:], test_utils=utils)  # no bias


@pytest.mark.parametrize("precision,act_unsigned,lead,R", CONFIGS)
def test_opcheck_linear(precision, act_unsigned, lead, R):
    args = _linear_args(precision, act_unsigned, lead=lead, R=R)
    utils = _utils(False)
    if precision == "nvfp4":  # see test_opcheck_gemm: no float8 allclose in SchemaCheckMode
        utils = tuple(u for u in utils if u != "test_schema")
    torch.library.opcheck(OPS.linear.default, (*args, precision, act_unsigned), test_utils=utils)


W4A16_CONFIGS = [((3,), torch.bfloat16, torch.bfloat16, True), ((2, 5), torch.float16, torch.float32, False),
                 ((1,), torch.float32, torch.float16, True), ((0,), torch.bfloat16, torch.bfloat16, True)]


@pytest.mark.parametrize("lead,x_dtype,scale_dtype,bias", W4A16_CONFIGS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_w4a16_linear(lead, x_dtype, scale_dtype, bias, requires_grad):
    from .test_w4a16_op import w4a16_args, w4a16_inputs

    a = w4a16_inputs(lead, 24, 128, x_dtype, scale_dtype, generator(("opcheck_w4a16", lead)), bias=bias)
    if requires_grad:
        for name in ("x", "scales", "zeros", "bias"):
            if a[name] is not None:
                a[name].requires_grad_(True)
    torch.library.opcheck(OPS.w4a16_linear.default, tuple(w4a16_args(a)), test_utils=_utils(requires_grad))


@pytest.mark.parametrize("lead,x_dtype,scale_dtype,bias", W4A16_CONFIGS)
def test_opcheck_w4a16_linear_group(lead, x_dtype, scale_dtype, bias):
    from .test_w4a16_op import w4a16_inputs

    g = generator(("opcheck_w4a16_group", lead))
    ws = [w4a16_inputs(lead, N, 128, x_dtype, scale_dtype, g, bias=bias and i != 1) for i, N in enumerate((24, 16, 40))]
    args = (ws[0]["x"], [w["codes"] for w in ws], [w["scales"] for w in ws], [w["zeros"] for w in ws],
            [w["bias"] for w in ws])
    torch.library.opcheck(OPS.w4a16_linear_group.default, args)


def test_backward_raises_not_implemented():
    y = ops.linear(*_linear_args("int4", requires_grad=True), "int4")
    with pytest.raises(RuntimeError, match="not implemented"):
        y.float().sum().backward()


def test_ops_registered_with_cpu_and_fake_kernels():
    ns = torch.ops.svdquant
    for name in ("quantize_act", "quantize_act_given_amax", "gemm", "gemm_cat", "expand_w4a8_weight", "gemm_expanded",
                 "w4a16_linear", "w4a16_linear_group"):
        assert hasattr(ns, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"svdquant::{name}", "CPU")
        entry = torch._library.simple_registry.singleton.find(f"svdquant::{name}")
        assert entry.fake_impl.kernel is not None, f"{name} has no fake kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("svdquant::linear", "CompositeImplicitAutograd")
    # parallel_linears: one linear after the other for every backend without a kernel of its own (the CPU included)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("svdquant::parallel_linears", "CompositeExplicitAutograd")
    assert torch._library.simple_registry.singleton.find("svdquant::parallel_linears").fake_impl.kernel is not None


def test_second_import_does_not_recompile(tmp_path):
    # The library is already built and loaded by this process (ops.load() above); a fresh interpreter must load
    # the cached build.
    so = build.library_path()
    assert so is not None and so.exists()
    mtime = so.stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "-c", "from svdquant_ops import ops; print(ops.load())"],
                          capture_output=True, text=True, check=True)
    assert "compiling" not in proc.stderr
    assert proc.stdout.strip() == str(so)
    assert so.stat().st_mtime_ns == mtime


def test_build_key_tracks_sources_and_torch(monkeypatch):
    srcs = build._sources(None)
    key = build._build_key(srcs, None)
    assert key == build._build_key(srcs, None)
    assert key != build._build_key(srcs, "9.0a")
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert key != build._build_key(srcs, None)


def test_build_key_for_another_machine_is_that_machines_own():
    """benchmarks/prebuild.py names the GPU machine's cache entry with _build_key(..., target): given this process's
    own values it must be the key this process uses (else a prebuilt entry would never be found), and each of the
    target's values must change it (else an entry built for another torch or Python would be loaded)."""
    srcs = build._sources("9.0a")
    here = {"torch": torch.__version__, "cuda": torch.version.cuda, "ld": build._libstdcxx_ldflags(),
            "py": tuple(sys.version_info[:2])}
    key = build._build_key(srcs, "9.0a")
    assert build._build_key(srcs, "9.0a", dict(here)) == key
    # the key's format as entries built before `target` existed were named (a change would orphan every cache)
    h = hashlib.sha256()
    for path in srcs + sorted(build._CSRC.rglob("*.h")) + sorted(build._CSRC.rglob("*.cuh")):
        h.update(str(path.relative_to(build._CSRC)).encode())
        h.update(path.read_bytes())
    h.update(f"torch={torch.__version__};cuda={torch.version.cuda};arch=9.0a;flags={build._cxx_flags()};"
             f"nvcc={build._nvcc_flags('9.0a')}".encode())
    h.update(b"ld=['/x/libstdc++.so.6']")
    h.update(f"py={sys.version_info[:2]}".encode())
    assert build._build_key(srcs, "9.0a", dict(here, ld=["/x/libstdc++.so.6"])) == h.hexdigest()[:16]
    for field, other in (("torch", "0.0.0-other"), ("cuda", "0.0"), ("ld", ["/elsewhere/libstdc++.so.6"]),
                         ("py", (2, 7))):
        assert build._build_key(srcs, "9.0a", dict(here, **{field: other})) != key, field


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and ELF linking are Linux's")
def test_a_compiler_without_shared_libstdcxx_links_torchs(monkeypatch, tmp_path):
    """A compiler that can link libstdc++ only statically (the GPU image's /opt/gcc, 2026-12-06) gave the library
    its own uninitialised copy of the C++ runtime, and the first number formatted into an error message crashed the
    process. Then the build links the libstdc++ this process has loaded (torch's) and keys the cache on it; a
    compiler that finds a shared libstdc++ itself, or cannot be run, changes neither the flags nor the key."""
    import hashlib

    from torch.utils import cpp_extension

    seen = {"cmds": [], "hashed": []}

    def fake_run(stdout, returncode=0):
        def run(cmd, **kw):
            seen["cmds"].append(list(cmd))
            return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr="")
        return run

    real_sha256 = hashlib.sha256

    class Recording:  # what _build_key hashes
        def __init__(self):
            self._h = real_sha256()

        def update(self, data):
            seen["hashed"].append(bytes(data))
            self._h.update(data)

        def hexdigest(self):
            return self._h.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Recording)
    srcs = build._sources(None)
    with open("/proc/self/maps") as maps:
        loaded = {line.split(maxsplit=5)[-1].strip() for line in maps if "/libstdc++.so" in line}

    keys = {}
    for case, run in {"shared": fake_run("/usr/lib/gcc/x86_64-linux-gnu/12/libstdc++.so\n"),
                      "compiler fails": fake_run("", returncode=1),
                      "static only": fake_run("libstdc++.so\n")}.items():
        monkeypatch.setattr(subprocess, "run", run)
        seen["hashed"].clear()
        keys[case] = (build._libstdcxx_ldflags(), build._build_key(srcs, None),
                      any(b"ld=" in chunk for chunk in seen["hashed"]))
    assert keys["shared"][0] == [] and not keys["shared"][2]
    assert keys["compiler fails"] == keys["shared"]
    flags, key, hashed = keys["static only"]
    assert len(flags) == 1 and flags[0] in loaded and os.path.isabs(flags[0])
    assert hashed and key != keys["shared"][1]

    # CXX may name a launcher and the compiler: both are run, not one program named "ccache g++".
    monkeypatch.setenv("CXX", "ccache g++")
    seen["cmds"].clear()
    assert build._libstdcxx_ldflags() == flags
    assert seen["cmds"][-1][:2] == ["ccache", "g++"]

    # The build passes the flag to the linker.
    captured = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: captured.update(kw))
    build._compile(srcs, tmp_path, None, verbose=False)
    assert flags[0] in captured["extra_ldflags"]
