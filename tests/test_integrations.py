"""compacter_kernels.integrations on small random models (no downloads), CPU.

AdapterHub: the fused model's outputs, loss and every trainable gradient equal the library's,
for each supported config; state_dict / save / load / optimiser steps are unaffected; what the
fused op cannot compute falls back with one log line. transformers: add_adapters on BERT,
RoBERTa and T5 configs. Skipped when `adapters` / `transformers` are not installed.
"""

import copy
import logging
import subprocess
import sys

import pytest
import torch

import compacter_kernels.backends as backends

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from compacter_kernels.integrations.transformers import (  # noqa: E402
    add_adapters,
    adapters_of,
    trainable_parameters,
)
from compacter_kernels.nn import PHMRule  # noqa: E402
from utils import checkout_env  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
F64 = dict(atol=1e-10, rtol=1e-8)
# The kernel tests run on the GPU when there is one (else Triton's CPU interpreter, see conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def op_calls(monkeypatch):
    """Records (backend that ran, op) for every call of a functional op: proves the fused op ran."""
    from compacter_kernels import functional

    calls = []
    for attr, op in (("compacter_adapter", "compacter_adapter"), ("adapter", "adapter"), ("_adapter_linear", "adapter"),
                     ("multitask_compacter_adapter", "multitask_compacter_adapter"),
                     ("multitask_adapter", "multitask_adapter"), ("phm_linear", "phm_linear")):
        def wrapper(x, *args, _fn=getattr(functional, attr), _op=op, backend="auto", **kwargs):
            calls.append((backends.select(backend, x), _op))
            return _fn(x, *args, backend=backend, **kwargs)
        monkeypatch.setattr(functional, attr, wrapper)
    return calls


def _batch(vocab=100, batch=3, seq=9, device="cpu"):
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding
    batch = dict(input_ids=ids, attention_mask=mask, labels=torch.randint(0, 2, (batch,)))
    return {k: v.to(device) for k, v in batch.items()}


def _run(model, batch):
    """(logits, loss, {name: grad} of every trainable parameter) of one forward/backward."""
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return out.logits.detach(), out.loss.detach(), grads


def _assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[1], **tol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


# --------------------------------------------------------------------------------------- AdapterHub


def _hub():
    """(adapters, compacter_kernels.integrations.adapterhub), or skip the test without `adapters`."""
    adapters = pytest.importorskip("adapters")
    from compacter_kernels.integrations import adapterhub

    return adapters, adapterhub


def _hub_model(config, name="a", seed=0, dtype=torch.float64):
    adapters, _ = _hub()
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**SMALL, num_labels=2))
    adapters.init(model)
    model.add_adapter(name, config=config)
    model.train_adapter(name)
    with torch.no_grad():  # away from the near-identity init, so that every gradient is sizeable
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    return model.to(dtype).train()


def _hub_configs():
    c, _ = _hub()
    return {
        "compacter": c.CompacterConfig(reduction_factor=4),
        "compacter++": c.CompacterPlusPlusConfig(reduction_factor=4),
        "houlsby": c.DoubleSeqBnConfig(reduction_factor=4),
        "pfeiffer": c.SeqBnConfig(reduction_factor=4),
        "compacter-factorized-rule-rank2": c.CompacterConfig(reduction_factor=4, factorized_phm_rule=True,
                                                             phm_rank=2),
        "compacter-own-rules-gelu_new-scaling": c.CompacterConfig(reduction_factor=4, shared_phm_rule=False,
                                                                  non_linearity="gelu_new", scaling=0.5),
        "phm-adapter-full-W-no-bias": c.CompacterConfig(reduction_factor=4, factorized_phm_W=False, phm_bias=False,
                                                        phm_dim=8),
        "compacter-shared-W": c.CompacterConfig(reduction_factor=4, shared_W_phm=True),
        "pfeiffer-post-add-relu": c.SeqBnConfig(reduction_factor=8, residual_before_ln="post_add"),
    }


@pytest.mark.parametrize("config_name", [
    "compacter", "compacter++", "houlsby", "pfeiffer", "compacter-factorized-rule-rank2",
    "compacter-own-rules-gelu_new-scaling", "phm-adapter-full-W-no-bias", "compacter-shared-W",
    "pfeiffer-post-add-relu"])
def test_fused_equals_library(config_name, op_calls):
    _, hub = _hub()
    fuse_adapters, unfuse_adapters = hub.fuse_adapters, hub.unfuse_adapters
    config = _hub_configs()[config_name]
    model, batch = _hub_model(config), _batch()
    library = _run(model, batch)
    keys = list(model.state_dict())

    switched = fuse_adapters(model)
    n_modules = (2 if config["mh_adapter"] else 0) + (2 if config["output_adapter"] else 0)
    assert len(switched) == n_modules
    fused = _run(model, batch)
    _assert_same(fused, library, **F64)
    op = "compacter_adapter" if config["phm_layer"] else "adapter"
    assert op_calls == [("reference", op)] * n_modules  # auto on CPU = reference
    assert list(model.state_dict()) == keys  # same parameters, same names

    op_calls.clear()
    assert unfuse_adapters(model) == switched
    _assert_same(_run(model, batch), library, atol=0, rtol=0)
    assert op_calls == []


def test_save_load_round_trip(tmp_path):
    adapters, hub = _hub()
    fuse_adapters = hub.fuse_adapters

    model = _hub_model(adapters.CompacterConfig(reduction_factor=4))
    fuse_adapters(model)
    model.eval()
    batch = _batch()
    expected = model(**batch).logits
    model.save_adapter(str(tmp_path), "a")

    torch.manual_seed(0)  # the backbone of _hub_model, without its adapter
    other = BertForSequenceClassification(BertConfig(**SMALL, num_labels=2)).to(torch.float64)
    adapters.init(other)
    name = other.load_adapter(str(tmp_path))
    other.set_active_adapters(name)
    other.to(torch.float64)  # the loaded adapter comes in fp32, as on the library's own path
    assert len(fuse_adapters(other)) == 4
    torch.testing.assert_close(other.eval()(**batch).logits, expected, **F64)


def test_optimizer_steps_match_library():
    adapters, hub = _hub()
    fuse_adapters = hub.fuse_adapters

    models = [_hub_model(adapters.CompacterConfig(reduction_factor=4)) for _ in range(2)]
    fuse_adapters(models[1])
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for _ in range(3):
        batch = _batch()
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    p_library, p_fused = (dict(m.named_parameters()) for m in models)
    for name, p in p_library.items():
        torch.testing.assert_close(p_fused[name], p, **F64)
    assert not torch.equal(p_library["bert.shared_parameters.a.phm_rule"],
                           _hub_model(adapters.CompacterConfig(reduction_factor=4)).bert.shared_parameters.a.phm_rule)


def _compacter_records(caplog):
    return [r for r in caplog.records if r.name == "compacter_kernels"]


def test_fallback_logs_one_line(caplog, op_calls):
    adapters, hub = _hub()
    fuse_adapters = hub.fuse_adapters

    model, batch = _hub_model(adapters.SeqBnConfig(reduction_factor=4, ln_before=True)), _batch()
    library = _run(model, batch)
    with caplog.at_level(logging.WARNING, logger="compacter_kernels"):
        assert fuse_adapters(model) == []
    (record,) = _compacter_records(caplog)
    assert "'a'" in record.getMessage() and "ln_before" in record.getMessage()
    _assert_same(_run(model, batch), library, atol=0, rtol=0)
    assert op_calls == []


def test_dropout_fuses_in_eval_only(caplog, op_calls):
    adapters, hub = _hub()
    fuse_adapters = hub.fuse_adapters

    model, batch = _hub_model(adapters.CompacterConfig(reduction_factor=4, dropout=0.1)), _batch()
    expected = model.eval()(**batch).logits
    with caplog.at_level(logging.WARNING, logger="compacter_kernels"):
        assert len(fuse_adapters(model)) == 4
    (record,) = _compacter_records(caplog)
    assert "dropout=0.1" in record.getMessage()
    torch.testing.assert_close(model(**batch).logits, expected, **F64)
    assert len(op_calls) == 4
    op_calls.clear()
    model.train()(**batch).loss.backward()  # dropout active: the library's path
    assert op_calls == []


def test_fusion_composition_takes_library_path(op_calls):
    adapters, hub = _hub()
    fuse_adapters, Fuse = hub.fuse_adapters, adapters.Fuse

    model = _hub_model(adapters.CompacterConfig(reduction_factor=4))
    model.add_adapter("b", config=adapters.CompacterConfig(reduction_factor=4))
    model.add_adapter_fusion(Fuse("a", "b"))
    model.to(torch.float64).eval()
    batch = _batch()
    model.set_active_adapters(Fuse("a", "b"))
    expected = model(**batch).logits
    assert len(fuse_adapters(model)) == 8
    torch.testing.assert_close(model(**batch).logits, expected, atol=0, rtol=0)
    assert op_calls == []  # Fuse reads the adapters' `up` output: library path
    model.set_active_adapters("b")
    model(**batch)
    assert len(op_calls) == 4


def test_a_fuse_block_is_found_at_any_depth():
    adapters, hub = _hub()
    from adapters.composition import BatchSplit, Fuse, Parallel, Stack

    assert not hub._has_fuse("a") and not hub._has_fuse(Stack("a", "b"))
    assert not hub._has_fuse(Parallel("a", Stack("b", "c")))
    assert not hub._has_fuse(BatchSplit("a", "b", batch_sizes=[1, 1]))
    assert hub._has_fuse(Fuse("a", "b")) and hub._has_fuse(Stack("c", Fuse("a", "b")))
    assert hub._has_fuse(Parallel("d", Stack("c", Fuse("a", "b"))))


def test_the_context_lookups_are_the_librarys():
    """The swap-in reads AdapterSetup's and ForwardContext's innermost context itself (host time):
    what their get_context() gives, outside any, nested, and in a thread that never entered one."""
    import threading

    adapters, hub = _hub()
    from adapters.context import AdapterSetup, ForwardContext

    def same():
        return all(hub._innermost(c) is c.get_context() for c in (AdapterSetup, ForwardContext))

    seen = []
    thread = threading.Thread(target=lambda: seen.append(same()))
    thread.start()
    thread.join()
    assert seen == [True] and same()
    with AdapterSetup("a") as outer:
        with AdapterSetup("b") as inner:
            assert hub._innermost(AdapterSetup) is inner and same()
        assert hub._innermost(AdapterSetup) is outer and same()
    assert hub._innermost(AdapterSetup) is None and same()


@pytest.mark.parametrize("config_name", ["compacter++", "pfeiffer"])
def test_triton_backend_end_to_end(config_name, op_calls):
    """Outputs, loss and every gradient as the library's; the dense adapter reads the nn.Linear
    weights transposed, and their gradients keep the weights' layout (no copy to match it)."""
    adapters, hub = _hub()
    fuse_adapters = hub.fuse_adapters

    if not backends.available_backends()["triton"]:
        pytest.skip(f"triton: {backends.available_backends()['triton'].reason}")
    model = _hub_model(_hub_configs()[config_name], dtype=torch.float32).to(DEVICE)
    batch = _batch(batch=2, seq=8, device=DEVICE)
    library = _run(model, batch)
    fuse_adapters(model, backend="triton")
    fused = _run(model, batch)
    _assert_same(fused, library, atol=3e-4, rtol=1e-3)
    assert all(g.stride() == library[2][name].stride() for name, g in fused[2].items())
    assert op_calls == [("triton", "adapter" if config_name == "pfeiffer" else "compacter_adapter")] * 2


def test_bad_backend_name():
    adapters, hub = _hub()
    fuse_adapters = hub.fuse_adapters

    with pytest.raises(ValueError, match="backend"):
        fuse_adapters(_hub_model(adapters.SeqBnConfig()), backend="nope")


# ------------------------------------------------------------------------------------- transformers


def _hf_model(family):
    if family == "bert":
        return BertForSequenceClassification(BertConfig(**SMALL, num_labels=2)), _batch()
    if family == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**SMALL, num_labels=2, max_position_embeddings=40))
        return model, _batch()
    config = T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
                      decoder_start_token_id=0)
    batch = _batch()
    batch["labels"] = torch.randint(0, 100, (3, 4))
    return T5ForConditionalGeneration(config), batch


# adapters per method for 2-layer models: BERT/RoBERTa 2 sublayers a layer, T5 encoder + decoder
EXPECTED = {("compacter", False): 4, ("compacter++", False): 2, ("houlsby", False): 4,
            ("compacter", True): 8, ("compacter++", True): 4, ("houlsby", True): 8}


@pytest.mark.parametrize("family", ["bert", "roberta", "t5"])
@pytest.mark.parametrize("method", ["compacter", "compacter++", "houlsby"])
def test_add_adapters(family, method, op_calls):
    model, batch = _hf_model(family)
    model, batch = model.to(DEVICE).train(), {k: v.to(DEVICE) for k, v in batch.items()}
    with torch.no_grad():
        base = model(**batch).logits
    assert add_adapters(model, method, reduction_factor=4, backend="reference") is model
    inserted = adapters_of(model)
    assert len(inserted) == EXPECTED[method, family == "t5"]

    # Only adapter parameters (and the one rule) are trainable, and the rule is counted once.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if ".adapter." in n or n.startswith("phm_rule.")}
    rules = [n for n in trainable if "phm_rule" in n]
    assert rules == ([] if method == "houlsby" else ["phm_rule.phm_rule"])
    if method != "houlsby":
        assert all(a.down.shared_rule is model.phm_rule and a.up.shared_rule is model.phm_rule for a in inserted)

    with torch.no_grad():  # away from the near-identity init, whose effect is below float32 resolution
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    logits, loss, grads = _run(model, batch)
    assert len(op_calls) == len(inserted)
    assert set(grads) == trainable
    assert not torch.equal(logits, base)  # the adapters are in the path (near-identity at init)

    for a in inserted:  # "auto" (the reference on CPU, a fused kernel on GPU) computes the same
        a.backend = "auto"
    torch.testing.assert_close(_run(model, batch)[0], logits, atol=3e-4, rtol=1e-3)

    # With the up-projections zeroed each adapter is the identity: the backbone's output is back.
    with torch.no_grad():
        for a in inserted:
            (a.up.b if method != "houlsby" else a.b_up).zero_()
            (a.up.W_right if method != "houlsby" else a.w_up).zero_()
        torch.testing.assert_close(model(**batch).logits, base, atol=1e-5, rtol=1e-5)


def test_add_adapters_freezing_options_and_deepcopy():
    model, batch = _hf_model("bert")
    model.eval()
    add_adapters(model, "compacter", reduction_factor=8, unfreeze=("classifier",), train_layer_norms=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias", "bert.embeddings.LayerNorm.weight"} <= trainable
    assert not any("dense" in n and ".adapter." not in n for n in trainable)
    with pytest.raises(ValueError, match="already"):
        add_adapters(model)

    # A copy's hooks use the copy's adapters (the hook finds them on the module, not in a closure).
    twin = copy.deepcopy(model)
    expected = model(**batch).logits
    with torch.no_grad():
        for a in adapters_of(twin):
            a.up.b.add_(torch.randn_like(a.up.b))  # not a constant: LayerNorm would cancel it
    assert not torch.allclose(twin(**batch).logits, expected)
    torch.testing.assert_close(model(**batch).logits, expected, atol=0, rtol=0)


def test_trainable_fraction_t5_base_shape():
    # T5-base dimensions on the meta device: no memory, no download. The paper (Table 1) reports
    # 0.073% (Compacter) and 0.047% (Compacter++), counting the layer norms it also trains.
    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
    fractions = {}
    for method in ("compacter", "compacter++"):
        with torch.device("meta"):
            model = T5ForConditionalGeneration(config)
        add_adapters(model, method, reduction_factor=32, phm_dim=4, rank=1, train_layer_norms=True)
        trainable, total, fraction = trainable_parameters(model)
        assert 222_000_000 < total < 224_000_000 and fraction == trainable / total
        fractions[method] = round(100 * fraction, 3)
    assert fractions == {"compacter": 0.073, "compacter++": 0.047}

    rule = PHMRule(4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.rule = rule
    model[0].requires_grad_(False)
    assert trainable_parameters(model) == (64, 84, 64 / 84)


def test_core_package_imports_no_integration_dependency():
    code = ("import sys, compacter_kernels, compacter_kernels.integrations; "
            "assert not {'adapters', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env=checkout_env())


def _multitask_model(config, names=("a", "b", "c"), dtype=torch.float64):
    """_hub_model with one adapter per name (the config's, or one per name), every one trained."""
    adapters, _ = _hub()
    configs = config if isinstance(config, (list, tuple)) else [config] * len(names)
    model = _hub_model(configs[0], name=names[0], dtype=dtype)
    for name, c in zip(names[1:], configs[1:]):
        model.add_adapter(name, config=c)
    model.train_adapter(list(names))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    return model.to(dtype).train()


@pytest.mark.parametrize("config_name", ["compacter", "pfeiffer", "compacter-own-rules-gelu_new-scaling"])
def test_batch_split_and_multi_task_run_as_one_multitask_op(config_name, op_calls):
    """A BatchSplit (and a MultiTask, which the library runs as one) of fused adapters of one kind:
    one multitask call per adapter layer, outputs, loss and every gradient as the library's."""
    adapters, hub = _hub()
    config = _hub_configs()[config_name]
    model = _multitask_model(config)
    model.active_adapters = adapters.BatchSplit("a", "b", "c", batch_sizes=[2, 0, 1])
    batch = _batch()
    library = _run(model, batch)
    switched = hub.fuse_adapters(model)
    fused = _run(model, batch)
    _assert_same(fused, library, **F64)
    op = "multitask_compacter_adapter" if config["phm_layer"] else "multitask_adapter"
    n_layers = len(switched) // 3
    assert op_calls == [("reference", op)] * n_layers
    # MultiTask: the library sorts the rows by task and hands a BatchSplit to the layer.
    model.active_adapters = adapters.MultiTask("a", "b", "c")
    task_ids = torch.tensor([2, 0, 2])
    hub.unfuse_adapters(model)
    library = _run_with(model, batch, task_ids=task_ids)
    hub.fuse_adapters(model)
    op_calls.clear()
    _assert_same(_run_with(model, batch, task_ids=task_ids), library, **F64)
    assert op_calls == [("reference", op)] * n_layers


def _run_with(model, batch, **extra):
    """_run's (logits, loss, grads) with extra forward arguments, grads of the parameters that
    got one, and the model's output; without labels (Parallel) the loss is the logits' squares."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, **extra)
    loss = out.loss if out.loss is not None else out.logits.square().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), loss.detach(), grads, out


def _eval_with(model, batch, **extra):
    """The logits of an eval-mode forward without autograd (the multitask op's inference path)."""
    model.eval()
    try:
        with torch.no_grad():
            return model(**batch, **extra).logits
    finally:
        model.train()


def _fused_and_library(model, batch, backend="reference", **extra):
    """(fused, library): each a training run (_run_with) and an eval run's logits of ``model`` on
    ``batch``, fused on ``backend`` and unfused; the model is left unfused."""
    _, hub = _hub()
    runs, seed = [], int(torch.randint(2**31, ()))
    for fuse in (True, False):
        if fuse:
            assert hub.fuse_adapters(model, backend=backend)
        torch.manual_seed(seed)  # the same dropout masks in both training runs
        runs.append((_run_with(model, batch, **extra), _eval_with(model, batch, **extra)))
        hub.unfuse_adapters(model)
    return runs


# Task rows of a batch of 3: a task absent first, in the middle, last, all but one; a BatchSplit's
# list shorter than its children (what MultiTask builds with bincount when the last task is absent).
ABSENT_BATCH_SIZES = [[0, 2, 1], [2, 0, 1], [2, 1, 0], [0, 0, 3], [0, 3, 0], [3, 0, 0], [2, 1], [3], [1, 2, 0, 0]]
ABSENT_TASK_IDS = [[2, 1, 2], [0, 2, 0], [1, 0, 1], [2, 2, 2], [1, 1, 1], [0, 0, 0]]


def _absent_task_setups(batch_sizes=ABSENT_BATCH_SIZES, task_ids=ABSENT_TASK_IDS):
    """(composition, forward arguments, rows per task) for each case above."""
    adapters, _ = _hub()
    for sizes in batch_sizes:
        yield adapters.BatchSplit("a", "b", "c", batch_sizes=sizes), {}, (sizes + [0, 0, 0])[:3]
    for ids in task_ids:
        yield adapters.MultiTask("a", "b", "c"), dict(task_ids=torch.tensor(ids)), [ids.count(t) for t in range(3)]


def _check_absent_tasks(model, setups, op, backend, op_calls, tol):
    """For each setup, on a fresh batch: the fused model's training run (outputs, loss, every
    gradient) and eval logits equal the library's, an absent task's gradients are zeros in both
    (the library runs it on an empty slice), and the multitask op ran in every adapter layer."""
    for setup, extra, rows in setups:
        model.active_adapters = setup
        batch = _batch(device=DEVICE)
        op_calls.clear()
        (fused, fused_eval), (library, library_eval) = _fused_and_library(model, batch, backend, **extra)
        calls = list(op_calls)
        what = f"{setup} {extra}"
        _assert_same(fused, library, **tol)
        torch.testing.assert_close(fused_eval, library_eval, **tol, msg=lambda m: f"{what} eval: {m}")
        for task, n in zip("abc", rows):
            grads = [g for name, g in library[2].items() if f".{task}." in name]
            assert grads and all(bool(g.any()) == (n > 0) for g in grads), (what, task)
        assert calls == [(backend, op)] * (2 * 4), what  # training and eval, 4 adapter layers


@pytest.mark.parametrize("config_name", ["compacter", "houlsby"])
def test_tasks_absent_from_the_batch(config_name, op_calls):
    """A BatchSplit / MultiTask where any task has no rows (first, middle, last, all but one), for
    Compacter (PHM) and Houlsby (dense) adapters: as the library, in training and eval."""
    config = _hub_configs()[config_name]
    op = "multitask_compacter_adapter" if config["phm_layer"] else "multitask_adapter"
    _check_absent_tasks(_multitask_model(config), _absent_task_setups(), op, "reference", op_calls, F64)


@pytest.mark.parametrize("config_name", ["compacter", "houlsby"])
def test_tasks_absent_from_the_batch_triton(config_name, op_calls):
    """The same on the triton backend (on the CPU, Triton's interpreter: a few cases)."""
    if not backends.available_backends()["triton"]:
        pytest.skip(f"triton: {backends.available_backends()['triton'].reason}")
    config = _hub_configs()[config_name]
    op = "multitask_compacter_adapter" if config["phm_layer"] else "multitask_adapter"
    model = _multitask_model(config, dtype=torch.float32).to(DEVICE)
    setups = [(s, {k: v.to(DEVICE) for k, v in e.items()}, r)
              for s, e, r in _absent_task_setups(batch_sizes=[[0, 3, 0]], task_ids=[[1, 0, 1]])]
    _check_absent_tasks(model, setups, op, "triton", op_calls, dict(atol=3e-4, rtol=1e-3))


def _assert_same_scores(fused, library):
    """adapter_gating_scores ({adapter: {layer: {location: array}}}) equal, key by key."""
    assert fused.keys() == library.keys() and library
    for name, layers in library.items():
        assert fused[name].keys() == layers.keys() and layers, name
        for layer, locations in layers.items():
            assert fused[name][layer].keys() == locations.keys() and locations, (name, layer)
            for location, score in locations.items():
                torch.testing.assert_close(torch.as_tensor(fused[name][layer][location]), torch.as_tensor(score),
                                           **F64, msg=lambda m, w=(name, layer, location): f"{w}: {m}")


@pytest.mark.parametrize("config_name", ["compacter", "houlsby"])
def test_gating_scores_as_library(config_name):
    """output_adapter_gating_scores=True (the library stores, per adapter and layer, the last
    element its Adapter.forward returns): the fused model's outputs, loss, gradients and scores
    equal the unfused model's, for one adapter, a BatchSplit, a MultiTask, an Average and a
    Parallel, in training and eval."""
    adapters, _ = _hub()
    from adapters import composition  # Average: not exported at the top level

    model = _multitask_model(_hub_configs()[config_name], names=("a", "b"))
    setups = [("a", {}), (adapters.BatchSplit("a", "b", batch_sizes=[1, 2]), {}),
              (adapters.MultiTask("a", "b"), dict(task_ids=torch.tensor([1, 0, 1]))),
              (composition.Average("a", "b"), {}), (adapters.Parallel("a", "b"), dict(labels=None))]
    for setup, extra in setups:
        model.active_adapters = setup
        batch = {**_batch(), **extra}
        (fused, fused_eval), (library, library_eval) = _fused_and_library(model, batch,
                                                                          output_adapter_gating_scores=True)
        _assert_same(fused, library, **F64)
        torch.testing.assert_close(fused_eval, library_eval, **F64)
        _assert_same_scores(fused[3].adapter_gating_scores, library[3].adapter_gating_scores)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_library_and_fused_children_join(backend, op_calls):
    """A BatchSplit / Parallel whose first child keeps the library's path (an adapter the fused op
    cannot compute, or dropout while training) beside fused ones: the library joins the children's
    `up` outputs, a tensor and the fused ones' None. As the library, in training and eval."""
    adapters, _ = _hub()
    if backend != "reference" and not backends.available_backends()[backend]:
        pytest.skip(f"{backend}: {backends.available_backends()[backend].reason}")
    dtype, tol = (torch.float64, F64) if backend == "reference" else (torch.float32, dict(atol=3e-4, rtol=1e-3))
    compacter = _hub_configs()["compacter"]
    unfused = adapters.DoubleSeqBnConfig(reduction_factor=4, ln_before=True)
    dropout = adapters.CompacterConfig(reduction_factor=4, dropout=0.1)
    model = _multitask_model([unfused, compacter, dropout], names=("u", "a", "d"), dtype=dtype).to(DEVICE)
    setups = [(adapters.BatchSplit("u", "a", batch_sizes=[1, 2]), {}),
              (adapters.BatchSplit("d", "a", batch_sizes=[2, 1]), {}),
              (adapters.Parallel("u", "a"), dict(labels=None))]
    for setup, extra in setups:
        model.active_adapters = setup
        batch = {**_batch(device=DEVICE), **extra}
        op_calls.clear()
        (fused, fused_eval), (library, library_eval) = _fused_and_library(model, batch, backend)
        _assert_same(fused, library, **tol)
        torch.testing.assert_close(fused_eval, library_eval, **tol)
        assert op_calls and {b for b, _ in op_calls} == {backend}, setup
