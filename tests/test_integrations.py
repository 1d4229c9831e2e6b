"""Where people already train (issue 17; docs/integrations.md):
- keyword example inputs (`example_kwargs=`, or a dict as `example_inputs`), optional inputs left
  out or None, the same keywords at call time, the model's own ModelOutput back, and losses
  computed inside the model (`labels=`) training with FA, DFA and SAL exactly as the same loss
  computed outside;
- Hugging Face `transformers.Trainer` (examples/hf_trainer.py): loss falls, checkpoints save and
  resume (resumed run = uninterrupted run), routing statistics in the logs;
- torchrun with 2 CPU processes (examples/torchrun_ddp.py), launched as a subprocess;
- PyTorch Lightning (examples/lightning.py): max_epochs=1, fast_dev_run, routing statistics
  through self.log, a checkpoint that reloads.
"""
import copy
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import salcompile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers = pytest.importorskip("transformers")

import hf_models as H  # noqa: E402


def _example(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}",
                                                  os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quiet_transform(*a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return salcompile.transform(*a, **kw)


@pytest.fixture(scope="module")
def bert():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, (ids, mask), _, _ = H.bert()
    return model, ids, mask, torch.tensor([0, 2])


@pytest.fixture(scope="module")
def gpt2():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, (ids,), _, _ = H.gpt2()
    return model, ids


# ------------------------------------------------------------------ keyword inputs
def test_keyword_example_inputs_dict_kwargs_and_mixed_capture_the_same_model(bert):
    model, ids, mask, y = bert
    kw = {"input_ids": ids, "attention_mask": mask, "labels": y}
    ref = model(**kw)
    a = _quiet_transform(model, example_inputs=kw, areas=1)   # dense FA: the model's forward
    b = _quiet_transform(model, example_kwargs=kw, areas=1)
    c = _quiet_transform(model, example_inputs=(ids,),
                         example_kwargs={"attention_mask": mask, "labels": y}, areas=1)
    for sal in (a, b, c):
        assert salcompile.module.input_names(sal) == ["input_ids", "attention_mask", "labels"]
        sal.load_state_dict(model.state_dict())
        out = sal(**kw)
        assert type(out) is type(ref)          # the model's own ModelOutput
        assert set(out.keys()) == {"loss", "logits"}
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(out.logits, ref.logits)
        torch.testing.assert_close(sal(ids, mask, labels=y).loss, ref.loss)   # positionally too
    with pytest.raises(salcompile.SalcompileError, match="both in example_inputs"):
        salcompile.transform(model, example_inputs=kw, example_kwargs={"labels": y})


def test_optional_inputs_left_out_or_none_and_unknown_ones_refused(bert):
    model, ids, mask, y = bert
    kw = {"input_ids": ids, "attention_mask": mask, "token_type_ids": None, "labels": y}
    sal = _quiet_transform(model, example_inputs=kw, areas=1)
    # token_type_ids=None (its default) is left out of the capture
    assert salcompile.module.input_names(sal) == ["input_ids", "attention_mask", "labels"]
    full = sal(**kw).loss
    torch.testing.assert_close(sal(input_ids=ids, attention_mask=mask, labels=y).loss, full)
    torch.testing.assert_close(sal(input_ids=ids, attention_mask=mask, labels=y,
                                   position_ids=None, inputs_embeds=None).loss, full)
    with pytest.raises(salcompile.SalcompileError, match="captured without input.*position_ids"):
        sal(input_ids=ids, attention_mask=mask, labels=y, position_ids=torch.arange(8)[None])
    with pytest.raises(salcompile.SalcompileError, match="called without them.*labels"):
        sal(input_ids=ids, attention_mask=mask)
    # without labels in the example: no loss, the same keywords otherwise
    nolab = _quiet_transform(model, example_inputs={"input_ids": ids, "attention_mask": mask})
    assert nolab(input_ids=ids, attention_mask=mask, labels=None).loss is None


def test_batch_and_sequence_stay_dynamic_with_keyword_inputs(gpt2):
    model, ids = gpt2
    sal = _quiet_transform(model, example_inputs={"input_ids": ids, "labels": ids})
    ids3 = torch.randint(0, H.VOCAB, (3, 5))
    out = sal(input_ids=ids3, labels=ids3)
    assert out.logits.shape == (3, 5, H.VOCAB) and out.loss.dim() == 0


def test_exported_program_with_kwargs_is_reused(bert):
    model, ids, mask, y = bert
    kw = {"input_ids": ids, "attention_mask": mask, "labels": y}
    ep = torch.export.export(model, (), kwargs=kw, strict=False)
    sal = _quiet_transform(ep, areas=1)
    assert salcompile.module.input_names(sal) == ["input_ids", "attention_mask", "labels"]
    assert sal(**kw).loss.dim() == 0


def _grads(sal):
    return {n: p.grad.detach().clone() for n, p in sal.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("feedback", ["fa", "dfa", "bp"])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_loss_inside_the_model_trains_like_the_same_loss_outside(name, feedback, bert, gpt2):
    """`labels=` makes the model compute its loss in the captured graph: every parameter's
    gradient equals the one from the same loss computed on the returned logits (FA; DFA, whose
    error is taken at the head's logits feeding the loss; SAL areas=4)."""
    if name == "bert":
        model, ids, mask, y = bert
        args, kw = (ids, mask), {"input_ids": ids, "attention_mask": mask, "labels": y}

        def outside(out):
            return F.cross_entropy(out.logits, y)
    else:
        model, ids = gpt2
        args, kw = (ids,), {"input_ids": ids, "labels": ids}

        def outside(out):
            lg = out.logits[:, :-1].float()
            return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))
    inside = _quiet_transform(model, example_inputs=kw, feedback=feedback, areas=4)
    plain = _quiet_transform(model, example_inputs=args, feedback=feedback, areas=4)
    assert [l.name for l in inside.sal_plan.layers] == [l.name for l in plain.sal_plan.layers]
    if feedback == "dfa":
        assert inside.sal_plan.dfa_taps and inside.sal_plan.head.name == plain.sal_plan.head.name
    loss_in = inside(**kw).loss
    loss_in.backward()
    loss_out = outside(plain(*args))
    loss_out.backward()
    torch.testing.assert_close(loss_in, loss_out)
    g_in, g_out = _grads(inside), _grads(plain)
    assert set(g_in) == set(g_out) and g_in
    for k in g_in:
        torch.testing.assert_close(g_in[k], g_out[k], msg=k)


def test_compiled_module_takes_keyword_inputs(bert):
    model, ids, mask, y = bert
    kw = {"input_ids": ids, "attention_mask": mask, "labels": y}
    sal = _quiet_transform(model, example_inputs=kw, areas=4)
    eager = sal(**kw).loss
    comp = salcompile.compile(copy.deepcopy(sal), backend="aot_eager")
    torch.testing.assert_close(comp(**kw).loss, eager)


# ------------------------------------------------------------------ Hugging Face Trainer
@pytest.fixture(scope="module")
def hf_example():
    pytest.importorskip("accelerate")
    return _example("hf_trainer")


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("kind,feedback", [("gpt2", "fa"), ("bert", "dfa")])
def test_hf_trainer_trains_saves_and_resumes(hf_example, tmp_path, kind, feedback):
    """SALTrainer: loss falls; the halfway checkpoint (GPT-2: tied embedding) resumes into a
    freshly transformed module and ends where the uninterrupted run ended."""
    torch.set_num_threads(1)
    tr, resumed = hf_example.run(kind, steps=6, feedback=feedback, areas=4,
                                 out_dir=str(tmp_path / "run"), resume=True, lr=1e-2)
    losses = hf_example.losses(tr)
    assert len(losses) == 6 and min(losses[-2:]) < losses[0]
    assert any(k.startswith("routing/gate_0/balance") for k in tr.state.log_history[0])
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "salcompile_plan.txt").exists()
    assert resumed.state.global_step == 6
    a, b = _params(tr.model), _params(resumed.model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    # the checkpoint also loads by hand (no key missing but tied aliases)
    from salcompile.integrations.hf import load_checkpoint
    fresh, _ = hf_example.transform(kind, feedback, 4)
    assert load_checkpoint(fresh, str(ckpt)) == []


def test_plain_hf_trainer_saves_and_resumes_an_untied_model(hf_example, tmp_path):
    """Without SALTrainer: the Trainer's own state_dict checkpoint works when no two parameters
    share a tensor (BERT), feedback buffers included."""
    from transformers import Trainer
    sal, data = hf_example.transform("bert", "fa", 4)
    args = hf_example.trainer(sal, data, str(tmp_path / "a"), 4, 1e-2, save_steps=2).args
    tr = Trainer(model=sal, args=args, train_dataset=data)
    tr.train()
    sal2, _ = hf_example.transform("bert", "fa", 4)
    args2 = hf_example.trainer(sal2, data, str(tmp_path / "b"), 4, 1e-2, save_steps=2).args
    tr2 = Trainer(model=sal2, args=args2, train_dataset=data)
    tr2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    a, b = _params(sal), _params(sal2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


# ------------------------------------------------------------------ torchrun
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_example_two_cpu_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "examples", "torchrun_ddp.py"), "--steps", "6"]
    r = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world 2, 6 steps" in r.stdout
    assert "max parameter difference between ranks: 0" in r.stdout
    assert "rows over all ranks" in r.stdout


def _doc_snippet(path, marker):
    """The first ```python block after `marker` in a markdown file."""
    text = open(path).read()
    rest = text[text.index(marker):]
    start = rest.index("```python\n") + len("```python\n")
    return rest[start:rest.index("```", start)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_distributed_doc_snippet_runs_under_torchrun_on_cpu(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_doc_snippet(os.path.join(ROOT, "docs", "distributed.md"),
                                   "Its core, runnable as it stands"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script)]
    r = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [l.split() for l in r.stdout.splitlines() if l[:2] in ("0 ", "1 ")]
    assert [l[0] for l in lines] == ["0", "1"]   # rank 0 prints each epoch


# ------------------------------------------------------------------ Lightning
@pytest.fixture(scope="module")
def lightning_example():
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    return _example("lightning")


def test_lightning_one_epoch_logs_routing_and_checkpoints(lightning_example, tmp_path):
    import lightning
    torch.set_num_threads(1)
    lm = lightning_example.build(areas=16)
    train, val = lightning_example.loaders()   # digits: 44 steps of 32 rows
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_epochs=1,
                                default_root_dir=str(tmp_path), enable_progress_bar=False,
                                enable_model_summary=False, log_every_n_steps=1)
    x0, y0 = val.dataset.tensors
    with torch.no_grad():
        before = float(F.cross_entropy(lm.model(x0), y0))
    salcompile.reset_routing_stats(lm.model)
    trainer.fit(lm, train, val)
    m = trainer.callback_metrics
    assert float(m["val_loss"]) < before
    assert 0.0 < float(m["routing/gate_0/balance"]) <= 1.0
    assert float(m["routing/gate_0/active"]) >= 1
    ckpts = list((tmp_path).rglob("*.ckpt"))
    assert ckpts
    state = torch.load(ckpts[0], weights_only=False)["state_dict"]
    fresh = lightning_example.build(areas=16)
    fresh.load_state_dict(state)
    for k, v in lm.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, msg=k)


def test_lightning_fast_dev_run_with_a_hf_model_and_its_own_loss(lightning_example, hf_example):
    import lightning
    from salcompile.integrations.lightning import SALLightningModule
    torch.set_num_threads(1)
    sal, data = hf_example.transform("gpt2", "fa", 4)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    lm = SALLightningModule(sal, lr=1e-2)
    trainer = lightning.Trainer(accelerator="cpu", fast_dev_run=2, enable_progress_bar=False,
                                enable_model_summary=False, logger=False)
    trainer.fit(lm, loader)
    assert trainer.global_step == 2
    assert "routing/gate_0/balance" in trainer.callback_metrics


def test_lightning_example_script_fast_dev_run(lightning_example):
    trainer, _, metrics = lightning_example.run(fast_dev_run=True, limit=200)
    assert trainer.global_step == 1 and "train_loss" in metrics
