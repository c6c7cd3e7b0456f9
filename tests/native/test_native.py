"""Building, locating and selecting the optional oneDNN library (jcnn/native/__init__.py)."""

import jax
import jax.numpy as jnp
import pytest

import jcnn.functional as F
from jcnn import native


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
    with pytest.raises(
        native.NativeBuildError, match=r"compiling onednn_conv\.cc failed \(exit 1\)"
    ):
        native.build()
    # Nothing half-built is left where the loader looks.
    assert not native.library_path().exists()
    assert not list((tmp_path / "cache").glob("*.so"))


def test_library_path_depends_on_compiler_and_onednn(tmp_path, monkeypatch):
    monkeypatch.setenv("JCNN_NATIVE_DIR", str(tmp_path))
    first = native.library_path()
    assert first.parent == tmp_path and first.suffix == ".so"
    assert native.library_path() == first
    monkeypatch.setenv("CXX", "clang++")
    second = native.library_path()
    monkeypatch.setenv("JCNN_ONEDNN_ROOT", str(tmp_path))
    assert len({first, second, native.library_path()}) == 3


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
    assert _custom_calls(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)) == 3
    assert _custom_calls(x.astype(jnp.float16), w.astype(jnp.float16)) == 0
    monkeypatch.setenv("JCNN_CONV_BACKEND", "xla")
    assert _custom_calls(x, w) == 0


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
