"""Building, locating and selecting the optional oneDNN library (jcnn/native/__init__.py)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcnn.functional as F
from jcnn import native
from jcnn.functional import _conv_cpu, _conv_onednn


def test_build_without_onednn_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("JCNN_ONEDNN_ROOT", str(tmp_path / "nowhere"))
    monkeypatch.setenv("JCNN_NATIVE_DIR", str(tmp_path / "cache"))
    with pytest.raises(
        native.NativeBuildError, match=r"oneDNN not found.*dnnl\.hpp.*jcnn\[native\]"
    ):
        native.build()
    assert not (tmp_path / "cache").exists()


def _fake_onednn(root):
    (root / "include" / "oneapi" / "dnnl").mkdir(parents=True)
    (root / "include" / "oneapi" / "dnnl" / "dnnl.hpp").write_text("")
    (root / "lib").mkdir()
    (root / "lib" / "libdnnl.so").write_bytes(b"")


def test_build_reports_a_missing_compiler_and_a_failed_compile(tmp_path, monkeypatch):
    _fake_onednn(tmp_path / "onednn")
    monkeypatch.setenv("JCNN_ONEDNN_ROOT", str(tmp_path / "onednn"))
    monkeypatch.setenv("JCNN_NATIVE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeBuildError, match="no C\\+\\+ compiler.*no-such-compiler"):
        native.build()
    monkeypatch.setenv("CXX", "false")
    sources = r"onednn_conv\.cc, channel_moments\.cc, depthwise_weight_grad\.cc"
    failed = rf"compiling {sources} failed \(exit 1\)"
    with pytest.raises(native.NativeBuildError, match=failed):
        native.build()
    # Nothing half-built is left where the loader looks.
    assert not native.library_path().exists()
    assert not list((tmp_path / "cache").glob("*.so"))


def test_an_unknown_flag_is_one_line_and_builds_nothing(capsys, monkeypatch):
    # argparse printed its usage block before the error, unlike jcnn-train/-eval/-data
    monkeypatch.setattr(native, "build", lambda **kwargs: pytest.fail("built"))
    with pytest.raises(SystemExit) as exit:
        native.main(["--jobs", "4"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        "jcnn-build-native: error: unrecognized arguments: --jobs 4 "
        "(jcnn-build-native --help lists the flags)\n"
    )


def test_build_names_a_library_folder_it_cannot_write(tmp_path, monkeypatch, capsys):
    # a JCNN_NATIVE_DIR under a file (or without permission) was a raw OSError from mkdir
    _fake_onednn(tmp_path / "onednn")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("JCNN_ONEDNN_ROOT", str(tmp_path / "onednn"))
    monkeypatch.setenv("JCNN_NATIVE_DIR", str(tmp_path / "file" / "cache"))
    cannot = r"cannot write the library to .*file.*cache .*JCNN_NATIVE_DIR at a writable folder"
    with pytest.raises(native.NativeBuildError, match=cannot):
        native.build()
    assert native.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jcnn-build-native: cannot write") and err.count("\n") == 1


def test_library_path_depends_on_compiler_and_onednn(tmp_path, monkeypatch):
    monkeypatch.setenv("JCNN_NATIVE_DIR", str(tmp_path))
    first = native.library_path()
    assert first.parent == tmp_path and first.suffix == ".so"
    assert native.library_path() == first
    monkeypatch.setenv("CXX", "clang++")
    second = native.library_path()
    monkeypatch.setenv("JCNN_ONEDNN_ROOT", str(tmp_path))
    assert len({first, second, native.library_path()}) == 3


def test_a_blank_cxx_is_the_default_compiler_and_an_unsplittable_one_is_named(
    tmp_path, monkeypatch, capsys
):
    # CXX= (blank) looked for a library built by no compiler (so an existing build went unused)
    # and built with '-O2' as the compiler; an unclosed quote was shlex's bare "No closing
    # quotation", from jcnn-build-native and from every F.conv through available().
    _fake_onednn(tmp_path / "onednn")
    monkeypatch.setenv("JCNN_ONEDNN_ROOT", str(tmp_path / "onednn"))
    monkeypatch.setenv("JCNN_NATIVE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CXX", raising=False)
    default = native.library_path()
    for blank in ("", "  "):
        monkeypatch.setenv("CXX", blank)
        assert native.library_path() == default
    monkeypatch.setenv("CXX", "'g++")
    unsplittable = r"CXX: expected a compiler command .* got \"'g\+\+\" \(No closing quotation\)"
    with pytest.raises(ValueError, match=unsplittable):
        native.library_path()
    assert native.main([]) == 2
    assert capsys.readouterr().err.startswith("jcnn-build-native: CXX: expected")


def test_bad_folders_in_the_environment_are_refused(tmp_path, monkeypatch, capsys):
    # JCNN_NATIVE_DIR= (empty) built and loaded the library in the current folder, a file there
    # failed in mkdir with a raw FileExistsError, and a quoted '~' made a folder named '~'.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("JCNN_NATIVE_DIR", "~/libs")
    assert native.library_path().parent == tmp_path / "libs"
    (tmp_path / "a-file").write_text("")
    for value, shown in (("", "''"), (str(tmp_path / "a-file"), r"'.*a-file' \(not a folder\)")):
        monkeypatch.setenv("JCNN_NATIVE_DIR", value)
        match = rf"JCNN_NATIVE_DIR: expected a folder for the built library .*got {shown}"
        with pytest.raises(ValueError, match=match):
            native.library_path()
        # available() refuses it too while the library is not loaded (once loaded, it stays loaded)
        assert native.main([]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jcnn-build-native: JCNN_NATIVE_DIR: expected")
        assert err.count("\n") == 1
    assert (tmp_path / "a-file").read_text() == ""
    monkeypatch.delenv("JCNN_NATIVE_DIR")
    monkeypatch.setenv("JCNN_ONEDNN_ROOT", "")
    with pytest.raises(ValueError, match="JCNN_ONEDNN_ROOT: expected a oneDNN installation folder"):
        native.onednn_root()
    assert native.main([]) == 2


def test_conv_backend_choice(monkeypatch):
    monkeypatch.setenv("JCNN_CONV_BACKEND", "cudnn")
    with pytest.raises(
        ValueError, match="JCNN_CONV_BACKEND: expected one of auto, onednn, xla, got 'cudnn'"
    ):
        native.conv_backend()
    monkeypatch.setenv("JCNN_CONV_BACKEND", "xla")
    assert native.conv_backend() == "xla"
    monkeypatch.setattr(native, "_load", lambda: "not built (/x.so does not exist)")
    monkeypatch.setenv("JCNN_CONV_BACKEND", "auto")
    assert native.conv_backend() == "xla"
    with pytest.raises(RuntimeError, match="the oneDNN library is not built"):
        native.load()
    monkeypatch.setenv("JCNN_CONV_BACKEND", "onednn")
    with pytest.raises(
        RuntimeError, match="JCNN_CONV_BACKEND=onednn but the oneDNN library is not built"
    ):
        native.conv_backend()
    monkeypatch.setenv("JCNN_CONV_BACKEND", "xla")
    monkeypatch.setenv("JCNN_ONEDNN_GROUPED_LAYOUT", "nChw16c")
    with pytest.raises(
        ValueError,
        match="JCNN_ONEDNN_GROUPED_LAYOUT: expected one of blocked, channels_last .*'nChw16c'",
    ):
        native.conv_backend()


def test_a_bad_conv_backend_is_refused_inside_a_scope_too(monkeypatch):
    # Inside conv_backend_scope (so under native.portable, and in fit on several devices) a typo
    # in JCNN_CONV_BACKEND was silently ignored, while the same run on one device refused it.
    monkeypatch.setenv("JCNN_CONV_BACKEND", "XLA")
    match = "JCNN_CONV_BACKEND: expected one of auto, onednn, xla, got 'XLA'"
    with native.conv_backend_scope("xla"), pytest.raises(ValueError, match=match):
        native.conv_backend()
    with pytest.raises(ValueError, match=match):
        native.portable(native.conv_backend)()


def test_a_bad_grouped_layout_is_refused_wherever_the_library_is_used(monkeypatch):
    # Only conv_backend checked it: native.load, available, implementation (and the oneDNN
    # convolutions called directly) let the library silently use its own choice instead.
    monkeypatch.setenv("JCNN_ONEDNN_GROUPED_LAYOUT", "Blocked")
    match = "JCNN_ONEDNN_GROUPED_LAYOUT: expected one of blocked, channels_last .*'Blocked'"
    plain = (4, 16, 32, 1, 8, 8, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1)
    for call in (native.load, native.available, lambda: native.implementation(0, False, plain, 2)):
        with pytest.raises(ValueError, match=match):
            call()


def _custom_calls(x, w):
    """oneDNN calls in the compiled gradient of a loss through F.conv, traced afresh."""

    def loss(x, w):
        return jnp.sum(F.conv(x, w, padding=1) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(x, w).as_text().count("jcnn_conv_")


def test_f_conv_dispatch(onednn, monkeypatch):
    x, w = jnp.ones((2, 7, 7, 3)), jnp.ones((3, 3, 3, 5))
    monkeypatch.setenv("JCNN_CONV_BACKEND", "auto")
    assert _custom_calls(x, w) == 3  # forward, input gradient, weight gradient
    # bfloat16 through oneDNN where this CPU has its kernels (AVX-512, AVX2-VNNI-2), else XLA.
    bfloat16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    supported = _conv_onednn.unsupported_reason(*bfloat16, (1, 1), ((1, 1),) * 2, (1, 1), 1) is None
    assert _custom_calls(*bfloat16) == (3 if supported else 0)
    assert _custom_calls(x.astype(jnp.float16), w.astype(jnp.float16)) == 0
    monkeypatch.setenv("JCNN_CONV_BACKEND", "xla")
    assert _custom_calls(x, w) == 0


def test_implementation_names_the_kernel_onednn_chose(onednn):
    # batch, C_in, C_out, groups, then per spatial dim: in, out, window, stride, dilation, lo, hi
    plain = (4, 16, 32, 1, 8, 8, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1)
    for op in range(3):
        name = native.implementation(op, False, plain, 2)
        assert isinstance(name, str) and name, op
        assert native.unsupported_reason(op, False, plain, 2) is None
    # No kernel, no name: a 0-extent window is refused by oneDNN.
    empty = (4, 16, 32, 1, 8, 8, 8, 8, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
    assert native.unsupported_reason(0, False, empty, 2) is not None
    assert native.implementation(0, False, empty, 2) is None


def test_implementation_checks_the_problem_before_the_library_reads_it(monkeypatch):
    # The library reads 4 + 7 * spatial values from dims whatever its length: a short tuple was
    # read past its end, and a 2-D problem asked as 1-D was silently read as another problem.
    monkeypatch.setattr(native, "load", lambda: pytest.fail("the library was asked"))
    plain = (4, 16, 32, 1, 8, 8, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1)
    for call in (native.implementation, native.unsupported_reason):
        with pytest.raises(ValueError, match=r"dims: expected a tuple of 18 ints .*got \(4, 16\)"):
            call(0, False, (4, 16), 2)
        with pytest.raises(ValueError, match="dims: expected a tuple of 11 ints"):
            call(0, False, plain, 1)
        with pytest.raises(ValueError, match=r"op: expected an int in \[0, 2\], got 3"):
            call(3, False, plain, 2)
        with pytest.raises(ValueError, match=r"spatial: expected an int in \[1, 3\], got 0"):
            call(0, False, (4, 16, 32, 1), 0)
        with pytest.raises(TypeError, match="bfloat16: expected a Python bool, got 1"):
            call(0, 1, plain, 2)
        with pytest.raises(TypeError, match=r"dims\[4\]: expected an int, got 8.0"):
            call(0, False, (*plain[:4], 8.0, *plain[5:]), 2)
        # The library divides the channels by the groups: 0 (or 2**64, which ctypes wrapped to
        # 0) killed the process with SIGFPE.
        for groups in (0, 2**64):
            with pytest.raises(ValueError, match=rf"dims\[3\]: expected an int in .*got {groups}"):
                call(0, False, (*plain[:3], groups, *plain[4:]), 2)
        with pytest.raises(ValueError, match=r"dims\[0\]: expected an int in .*got 18446744073"):
            call(0, False, (2**64 + 4, *plain[1:]), 2)


def test_build_command_self_checks(onednn, capsys):
    assert native.main([]) == 0
    out = capsys.readouterr().out
    assert str(native.library_path()) in out and "max relative error" in out


def test_conv_backend_scope_overrides_the_environment(onednn, monkeypatch):
    monkeypatch.setenv("JCNN_CONV_BACKEND", "onednn")
    x, w = jnp.ones((2, 7, 7, 3)), jnp.ones((3, 3, 3, 5))
    with native.conv_backend_scope("xla"):
        assert native.conv_backend() == "xla"
        assert _custom_calls(x, w) == 0
        with native.conv_backend_scope(None):
            assert native.conv_backend() == "xla"
    assert _custom_calls(x, w) == 3
    with pytest.raises(ValueError, match="backend: expected one of auto, onednn, xla or None"):
        with native.conv_backend_scope("cudnn"):
            pass


def test_a_function_jitted_before_a_scope_runs_the_scopes_backend_inside_it(onednn, monkeypatch):
    # jit's cache kept the first trace: inside conv_backend_scope("xla") (so under
    # native.portable, or fit on several devices) a function jitted before ran oneDNN's calls
    monkeypatch.setenv("JCNN_CONV_BACKEND", "onednn")
    x, w = jnp.ones((2, 7, 7, 3)), jnp.ones((3, 3, 3, 5))
    traced = []

    @jax.jit
    def conv(x, w):
        traced.append(native.conv_backend())
        return F.conv(x, w, padding=1)

    expected = conv(x, w)
    with native.conv_backend_scope("xla"):
        np.testing.assert_allclose(conv(x, w), expected, rtol=1e-6)
        assert "jcnn_conv_" not in conv.lower(x, w).as_text()
        exported = jax.export.export(jax.jit(native.portable(conv)))(x, w)
    assert traced[:2] == ["onednn", "xla"]
    assert "jcnn_conv_" not in exported.mlir_module()
    assert "jcnn_conv_" in conv.lower(x, w).as_text()


@pytest.mark.skipif(
    os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2", reason="runs with oneDNN capped at AVX2"
)
def test_a_cpu_without_bfloat16_kernels_routes_bfloat16_to_xla(onednn):
    x, w = jnp.ones((2, 7, 7, 3), jnp.bfloat16), jnp.ones((3, 3, 3, 5), jnp.bfloat16)
    options = ((1, 1), ((1, 1),) * 2, (1, 1), 1)
    assert "bfloat16 forward" in _conv_onednn.unsupported_reason(x, w, *options)
    assert _custom_calls(x, w) == 0
    assert _custom_calls(x.astype(jnp.float32), w.astype(jnp.float32)) == 3
    got = F.conv(x, w, padding=1)
    want = _conv_cpu.conv_general(x, w, *options)
    assert got.dtype == jnp.bfloat16
    assert jnp.array_equal(got, want)


def _pass_with_onednn_capped_at_avx2(tests, **environment):
    """Run ``tests`` in a fresh process with oneDNN capped at AVX2 (and ``environment`` set); all
    must pass."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "JCNN_REQUIRE_NATIVE": "1", **environment}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", *tests],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(tests)} passed" in result.stdout


@pytest.mark.skipif("ONEDNN_MAX_CPU_ISA" in os.environ, reason="already capped")
def test_bfloat16_tests_pass_on_a_cpu_without_bfloat16_kernels(onednn):
    # Whatever this machine is, rerun the bfloat16 tests as an AVX2-only CPU (no bfloat16 in
    # oneDNN 3.2) sees them, so the fallback is exercised on every machine.
    tests = [
        "tests/native/test_native.py::test_a_cpu_without_bfloat16_kernels_routes_bfloat16_to_xla",
        "tests/native/test_native.py::test_f_conv_dispatch",
        "tests/functional/test_conv_onednn.py::test_bfloat16_rounds_a_float32_accumulation_once",
        "tests/functional/test_conv.py::test_mixed_dtypes_promote_and_low_precision_is_kept",
        "tests/nn/test_conv.py::test_conv_dtype_and_param_dtype",
    ]
    _pass_with_onednn_capped_at_avx2(tests)


@pytest.mark.skipif("ONEDNN_MAX_CPU_ISA" in os.environ, reason="already capped")
def test_depthwise_tests_pass_with_the_avx2_kernels(onednn):
    # Depthwise convolutions run on oneDNN's ISA-specific depthwise kernels: rerun their tests
    # with oneDNN capped at AVX2, so an AVX-512 machine also checks what an AVX2-only CPU runs.
    tests = [
        "tests/functional/test_conv_onednn.py::test_depthwise_runs_every_product_natively_and_"
        "matches_xla[2]",
        "tests/functional/test_conv_onednn.py::test_depthwise_second_derivatives_and_per_example_"
        "gradients",
    ]
    _pass_with_onednn_capped_at_avx2(tests)


@pytest.mark.skipif("ONEDNN_MAX_CPU_ISA" in os.environ, reason="already capped")
def test_layout_rule_tests_pass_with_the_avx2_kernels(onednn):
    # Which products take oneDNN's blocked activation layout depends on the ISA (with AVX-512
    # grouped weight gradients and wide layers on small images): rerun the rule's tests with
    # oneDNN capped at AVX2, so an AVX-512 machine also checks the AVX2 rule and its reorders;
    # with grouped products in the blocked layout, so the reorders are checked on any CPU.
    module = "tests/functional/test_conv_onednn.py"
    tests = [
        f"{module}::test_products_in_onednns_own_layout_match_xla[{rank}]" for rank in (1, 2, 3)
    ]
    tests += [
        f"{module}::test_only_grouped_products_and_1d_weight_gradients_reorder_their_activations",
        f"{module}::test_wide_layers_on_small_images_reorder_their_activations_with_avx512",
    ]
    _pass_with_onednn_capped_at_avx2(tests, JCNN_ONEDNN_GROUPED_LAYOUT="blocked")


def test_export_of_a_portable_function(onednn, rng):
    def f(x, w):
        return jnp.tanh(F.conv(x, w, padding=1, stride=(2, 1)))

    x = jnp.asarray(rng.standard_normal((2, 9, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)
    with pytest.raises(ValueError, match="custom calls"):
        jax.export.export(jax.jit(lambda x, w: f(x, w)))(x, w)  # the oneDNN calls
    exported = jax.export.export(jax.jit(native.portable(f)))(x, w)
    assert "jcnn_conv_" not in exported.mlir_module()
    restored = jax.export.deserialize(exported.serialize())
    np_want = f(x, w)
    assert jnp.allclose(restored.call(x, w), np_want, rtol=1e-5, atol=1e-5)
    # Gradients export as well.
    grad = jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=1)
    exported_grad = jax.export.export(jax.jit(native.portable(grad)))(x, w)
    assert jnp.allclose(exported_grad.call(x, w), grad(x, w), rtol=1e-4, atol=1e-4)


def test_portable_names_a_non_function():
    # portable(5) returned a wrapper that failed only when called, far from the mistake
    for fun in (5, None, "conv"):
        with pytest.raises(TypeError, match="fun: expected a function to run on XLA's path"):
            native.portable(fun)
