"""benchmarks/conftest.py helpers that run without a GPU: the compile provider's settings."""
import torch

from benchmarks import conftest as C


def test_compiled_is_static_with_an_explicit_recompile_limit(monkeypatch):
    import torch._dynamo as dynamo
    name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(dynamo.config, name, 8)     # restored after the test
    if hasattr(dynamo.config, "fail_on_recompile_limit_hit"):
        monkeypatch.setattr(dynamo.config, "fail_on_recompile_limit_hit", False)
    f = C.compiled(lambda x: x * 2)
    assert getattr(dynamo.config, name) == C.RECOMPILE_LIMIT >= 32
    if hasattr(dynamo.config, "fail_on_recompile_limit_hit"):
        assert dynamo.config.fail_on_recompile_limit_hit
    assert callable(f) and getattr(f, "_torchdynamo_orig_callable", None) is not None
    assert C.make_provider_fn("eager", None, torch.neg) is torch.neg
