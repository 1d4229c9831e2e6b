"""export_train_step: one ONNX graph (forward, SAL gradients, optimizer update) that a plain
onnxruntime.InferenceSession runs, equal to torch.optim on the transformed module."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salcompile
from salcompile.errors import SalcompileError
from salcompile.models import MLP

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

export_train_step, TrainStepSession = salcompile.export_train_step, salcompile.TrainStepSession

RTOL = 1e-5


def _torch_step(ref, opt, loss, x, y):
    ref.train()
    opt.zero_grad()
    out = ref(x)
    value = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)) \
        if loss == "cross_entropy" else F.mse_loss(out, y)
    value.backward()
    opt.step()
    return value.item()


def _torch_optimizer(params, optimizer, **hp):
    if optimizer == "adamw":
        return torch.optim.AdamW(params, **hp)
    return torch.optim.SGD(params, **hp)


def _close(name, got, want, rtol=RTOL):
    want = want.detach().numpy() if hasattr(want, "detach") else want
    scale = max(np.abs(want).max(), 1e-6)
    err = np.abs(np.asarray(got) - want).max() / scale
    assert err < rtol, (name, err)


def _check(tmp_path, sal, x, y, batches, loss="cross_entropy", optimizer="adamw", steps=20,
           curve_rtol=1e-4, dynamic_batch=True, trains=True, **hp):
    """Export, then compare with torch.optim on a copy: the loss and every parameter and carried
    buffer after one step, and the losses of `steps` steps."""
    path = tmp_path / f"{optimizer}.onnx"
    info = export_train_step(sal, (x,), path, loss=loss, optimizer=optimizer,
                             dynamic_batch=dynamic_batch, **hp)
    import onnx
    onnx.checker.check_model(onnx.load(str(path)))
    ref = copy.deepcopy(sal)
    opt = _torch_optimizer(ref.parameters(), optimizer, **hp)
    sess = TrainStepSession(path, sal.state_dict())
    assert sess.data_names == ["input", "target"]
    xb, yb = batches[0]
    want = _torch_step(ref, opt, loss, xb, yb)
    got = sess.step(xb, yb)
    assert got == pytest.approx(want, rel=RTOL, abs=1e-7)
    trained = sess.state_dict()
    for n, p in ref.named_parameters():
        _close(n, trained[n], p)
    for n in info["state"]:
        if n in dict(ref.named_buffers()):
            _close(n, trained[n], ref.get_buffer(n))
    if optimizer == "adamw":   # the moments are torch's too
        for n, p in ref.named_parameters():
            st = opt.state[p]
            _close(n + ".exp_avg", sess.values[n + ".exp_avg"], st["exp_avg"])
            _close(n + ".exp_avg_sq", sess.values[n + ".exp_avg_sq"], st["exp_avg_sq"], 1e-4)
    ours, theirs = [got], [want]
    for k in range(1, steps):
        xb, yb = batches[k % len(batches)]
        theirs.append(_torch_step(ref, opt, loss, xb, yb))
        ours.append(sess.step(xb, yb))
    np.testing.assert_allclose(ours, theirs, rtol=curve_rtol, atol=1e-6)
    n = len(batches)
    assert np.mean(ours[-n:]) < np.mean(ours[:n]) or not trains   # the last pass over the batches vs the first
    return info, sess, ref


def _batches(shape, classes, n=5, seed=1, size=12):
    """n batches, labelled by a fixed random linear teacher (learnable)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(int(np.prod(shape)), classes, generator=g)
    xs = [torch.randn((size,) + shape, generator=g) for _ in range(n)]
    return [(x, (x.flatten(1) @ teacher).argmax(1)) for x in xs]


def _mlp(**fields):
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    return salcompile.transform(MLP(16, 32, 4, depth=3), (x,), **fields), x


# ---------------------------------------------------------------- dense MLPs: FA, DFA, BP
@pytest.mark.parametrize("feedback", ["fa", "dfa", "bp"])
def test_dense_mlp_adamw(tmp_path, feedback):
    sal, x = _mlp(areas=1, feedback=feedback)
    info, _, _ = _check(tmp_path, sal, x, None, _batches((16,), 4), lr=1e-2, weight_decay=0.05)
    assert info["parameters"] == [n for n, _ in sal.named_parameters()]
    assert info["inputs"][:len(info["parameters"])] == info["parameters"]
    assert info["outputs"][0] == "loss"
    assert [o for o in info["outputs"] if o.endswith(".new")][:2] == \
        ["layers.0.weight.new", "layers.0.bias.new"]
    if feedback != "bp":   # the feedback matrices are constant initializers
        assert info["constants"]


def test_fa_graph_is_not_backprop(tmp_path):
    """The same weights with B = W (backprop) and with random B give different updates."""
    fa, x = _mlp(areas=1, feedback_scale="none")
    bp, _ = _mlp(areas=1, feedback="bp")
    (xb, yb), = _batches((16,), 4, n=1)
    out = {}
    for name, sal in (("fa", fa), ("bp", bp)):
        export_train_step(sal, (x,), tmp_path / f"{name}.onnx", optimizer="sgd", lr=0.1)
        sess = TrainStepSession(tmp_path / f"{name}.onnx", sal.state_dict())
        sess.step(xb, yb)
        out[name] = sess.state_dict()
    w0 = "layers.0.weight"
    assert (out["fa"][w0] - out["bp"][w0]).abs().max() > 1e-4
    w2 = "layers.2.weight"   # the head's update does not depend on feedback
    torch.testing.assert_close(out["fa"][w2], out["bp"][w2])


def test_sgd_momentum_nesterov_frozen(tmp_path):
    sal, x = _mlp(areas=1)
    frozen = sal.get_parameter("layers.1.bias").requires_grad_(False)   # torch.optim skips it
    _, sess, _ = _check(tmp_path, sal, x, None, _batches((16,), 4), optimizer="sgd", lr=0.05,
                        momentum=0.9, nesterov=True, weight_decay=1e-3)
    torch.testing.assert_close(sess.state_dict()["layers.1.bias"], frozen.detach())


def test_mse_loss(tmp_path):
    sal, x = _mlp(areas=1, feedback="dfa")
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(12, 16, generator=g), torch.randn(12, 4, generator=g))
               for _ in range(5)]
    _check(tmp_path, sal, x, None, batches, loss="mse", optimizer="sgd", lr=0.05)


# ---------------------------------------------------------------- SAL: gates and areas
@pytest.mark.parametrize("optimizer,areas,depth,dynamic", [("adamw", 4, 3, True),
                                                            ("sgd", 16, 2, False)])
def test_partition_mlp(tmp_path, optimizer, areas, depth, dynamic):
    torch.manual_seed(0)
    x = torch.randn(16, 32)
    sal = salcompile.transform(MLP(32, 64, 4, depth=depth), (x,), areas=areas)
    assert sal.sal_plan.regions
    hp = dict(lr=1e-2) if optimizer == "adamw" else dict(lr=0.05, momentum=0.5)
    info, sess, ref = _check(tmp_path, sal, x, None, _batches((32,), 4, size=16), steps=20,
                             optimizer=optimizer, curve_rtol=1e-3, dynamic_batch=dynamic,
                             trains=areas == 4, **hp)   # K=16: 4 units per area; torch's own
                                                        # loss does not fall in 20 steps either
    proj = "sal_gates.gate_0.proj"
    assert proj in info["parameters"]   # the gate's P trains by its local rule, in the graph
    assert not np.allclose(sess.state_dict()[proj].numpy(), sal.get_parameter(proj).detach().numpy())
    assert "sal_gates.gate_0.prototypes" in info["constants"]


# ---------------------------------------------------------------- CNN with batch norm, transformer
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)   # a bias before BN gets a 0 gradient
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def test_cnn_batchnorm(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 14, 14)
    sal = salcompile.transform(SmallCNN(), (x,), areas=1)
    info, sess, ref = _check(tmp_path, sal, x, None, _batches((1, 14, 14), 5, size=8),
                             lr=1e-2)
    assert "bn.running_mean" in info["state"] and "bn.num_batches_tracked" in info["state"]
    assert int(sess.state_dict()["bn.num_batches_tracked"]) == 20
    sal.load_state_dict(sess.state_dict())   # shapes and keys as the module's own
    for n, t in ref.state_dict().items():
        _close(n, sal.state_dict()[n].float().numpy(), t.float(), 1e-4)


class TinyEncoder(nn.Module):
    def __init__(self, dim=16, classes=3):
        super().__init__()
        from salcompile.models.transformer import Block
        self.block = Block(dim, 2, 32)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.ln(self.block(x)).mean(1))


def test_transformer_encoder(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 5, 16)
    sal = salcompile.transform(TinyEncoder(), (x,), areas=1)
    # SGD: the key bias's true gradient is 0 (softmax ignores a per-query constant) and AdamW
    # turns its float noise into a full ±lr step, differently in torch and in onnxruntime.
    _check(tmp_path, sal, x, None, _batches((5, 16), 3, size=6), optimizer="sgd", lr=0.05,
           momentum=0.9)


# ---------------------------------------------------------------- the runner, bad input
def test_session_resumes_and_loads_back(tmp_path):
    sal, x = _mlp(areas=1)
    path = tmp_path / "s.onnx"
    export_train_step(sal, (x,), path, optimizer="adamw", lr=1e-2)
    batches = _batches((16,), 4, n=4)
    one = TrainStepSession(path, sal.state_dict())
    for xb, yb in batches:
        one.step(xb, yb)
    two = TrainStepSession(path, sal.state_dict())
    for xb, yb in batches[:2]:
        two.step(xb.numpy(), yb.numpy())
    three = TrainStepSession(path, {**two.state_dict(), **two.optimizer_state()})
    for xb, yb in batches[2:]:
        three.step(xb, yb)
    for k, v in one.state_dict().items():
        torch.testing.assert_close(three.state_dict()[k], v)
    assert float(three.optimizer_state()["optimizer.step"]) == 4
    sal.load_state_dict(one.state_dict())   # strict: every key comes back
    with pytest.raises(SalcompileError, match="takes 2 arrays"):
        one.step(batches[0][0])
    with pytest.raises(SalcompileError, match="lacks layers.0.weight"):
        TrainStepSession(path, {})


def test_bad_input(tmp_path):
    sal, x = _mlp(areas=1)
    with pytest.raises(SalcompileError, match="loss must be one of"):
        export_train_step(sal, (x,), tmp_path / "a.onnx", loss="hinge")
    with pytest.raises(SalcompileError, match="optimizer must be one of"):
        export_train_step(sal, (x,), tmp_path / "a.onnx", optimizer="lion")
    with pytest.raises(SalcompileError, match="salcompile.transform"):
        export_train_step(MLP(16, 32, 4), (x,), tmp_path / "a.onnx")
    with pytest.raises(SalcompileError, match="nesterov"):
        export_train_step(sal, (x,), tmp_path / "a.onnx", optimizer="adamw", nesterov=True)
    (tmp_path / "exists.onnx").write_bytes(b"keep")
    with pytest.raises(SalcompileError, match="exists"):
        export_train_step(sal, (x,), tmp_path / "exists.onnx")
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep"
    with pytest.raises(SalcompileError, match="does not run on example_inputs"):
        export_train_step(sal, (torch.randn(6, 7),), tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()
    with pytest.raises(SalcompileError, match="not a train-step graph"):
        salcompile.export_onnx(sal, (x,), tmp_path / "inference.onnx")
        TrainStepSession(tmp_path / "inference.onnx", sal.state_dict())


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_dropout_p0_is_the_identity(tmp_path, capture):
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 2))
    sal = salcompile.transform(model, (x,) if capture == "export" else None, areas=1)
    path = tmp_path / "d0.onnx"
    export_train_step(sal, (x,), path, optimizer="sgd", lr=0.1)
    y = torch.randint(0, 2, (4,))
    want = F.cross_entropy(sal(x), y).item()
    assert TrainStepSession(path, sal.state_dict()).step(x, y) == pytest.approx(want)


def _dropout_update(tmp_path, drop, shape, capture="export"):
    """dW of a head reading dropout(ones): column j is db·keep_j/(1-p), so the update shows the
    mask the graph drew. Returns (dW, db) of two steps."""
    torch.manual_seed(0)
    x = torch.ones((1,) + shape)
    width = int(np.prod(shape))
    model = nn.Sequential(drop, nn.Flatten(), nn.Linear(width, 2))
    sal = salcompile.transform(model, (x.expand((2,) + shape),) if capture == "export" else None,
                               areas=1)
    path = tmp_path / f"drop_{capture}.onnx"
    export_train_step(sal, (x.expand((2,) + shape),), path, optimizer="sgd", lr=1e-3)
    sess = TrainStepSession(path, sal)   # the module itself gives the weights
    out = []
    for _ in range(2):
        w0, b0 = sess.values["2.weight"].copy(), sess.values["2.bias"].copy()
        sess.step(x, torch.tensor([1]))
        out.append((w0 - sess.values["2.weight"], b0 - sess.values["2.bias"]))
    return out


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_dropout_draws_fresh_masks_with_torchs_distribution(tmp_path, capture):
    p, width = 0.3, 4000
    steps = _dropout_update(tmp_path, nn.Dropout(p), (width,), capture)
    masks = []
    for dw, db in steps:
        kept = np.abs(dw).sum(0) > 0
        # P(drop) = p: within 5 standard deviations of p over 4000 units
        assert abs((1 - kept.mean()) - p) < 5 * np.sqrt(p * (1 - p) / width)
        np.testing.assert_allclose(dw[:, kept], np.repeat(db[:, None] / (1 - p), kept.sum(), 1),
                                   rtol=1e-5, atol=1e-7)   # kept units scaled by 1/(1-p)
        masks.append(kept)
    assert (masks[0] != masks[1]).any()   # a fresh mask every step


def test_channel_dropout_drops_whole_channels(tmp_path):
    p, channels = 0.5, 400
    (dw, _), _ = _dropout_update(tmp_path, nn.Dropout2d(p), (channels, 2, 2))
    kept = (np.abs(dw).sum(0) > 0).reshape(channels, 4)
    assert (kept.all(1) | ~kept.any(1)).all()   # per channel: all four kept or all dropped
    assert abs((1 - kept[:, 0].mean()) - p) < 5 * np.sqrt(p * (1 - p) / channels)


def test_alpha_dropout_is_refused_by_name(tmp_path):
    x = torch.randn(4, 8)
    sal = salcompile.transform(nn.Sequential(nn.AlphaDropout(0.2), nn.Linear(8, 2)), (x,),
                               areas=1)
    with pytest.raises(SalcompileError, match="dropout .*not supported"):
        export_train_step(sal, (x,), tmp_path / "a.onnx")


def test_session_takes_the_archive_for_its_weights(tmp_path):
    sal, x = _mlp(areas=1)
    salcompile.save(sal, (x,), tmp_path / "m.pt2")
    export_train_step(sal, (x,), tmp_path / "s.onnx", optimizer="sgd", lr=0.1)
    y = torch.randint(0, 4, (6,))
    a = TrainStepSession(tmp_path / "s.onnx", tmp_path / "m.pt2").step(x, y)
    b = TrainStepSession(tmp_path / "s.onnx", sal.state_dict()).step(x, y)
    assert a == pytest.approx(b, rel=1e-6)


# ---------------------------------------------------------------- routed layers: compact / masked
ROUTED = {   # name -> (model, example shape, classes, transform fields)
    "partition16": (lambda: MLP(32, 64, 4, depth=3), (32,), 4, {"areas": 16}),
    "replicate": (lambda: MLP(32, 64, 4, depth=3), (32,), 4, {"areas": 4,
                                                              "area_mode": "replicate"}),
    "top2": (lambda: MLP(32, 64, 4, depth=3), (32,), 4, {"areas": 4, "route_top_k": 2}),
    "encoder": (lambda: TinyEncoder(), (5, 16), 3, {"areas": 4}),   # routed per token
}


@pytest.mark.parametrize("form", ["compact", "masked"])
@pytest.mark.parametrize("case", sorted(ROUTED))
def test_routed_forms_give_the_torch_gradients(tmp_path, case, form):
    """One SGD step with lr=1e4: (parameter - new parameter) / lr = the gradient (lr·g
    dominates p, so float32 keeps the gradient's own precision), which equals torch's FA /
    area / local-rule gradient in both forms of the routed layers; batch 12 over 16 areas leaves
    areas empty. The compact form sorts rows (TopK), the masked one does not."""
    import onnx
    build, shape, classes, fields = ROUTED[case]
    torch.manual_seed(0)
    x = torch.randn((6,) + shape)
    sal = salcompile.transform(build(), (x,), **fields)
    path = tmp_path / "s.onnx"
    lr = 1e4
    export_train_step(sal, (x,), path, optimizer="sgd", lr=lr, routed_form=form)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "TopK" in ops if form == "compact" or case == "top2" else "TopK" not in ops
    g = torch.Generator().manual_seed(2)
    xb = torch.randn((12,) + shape, generator=g)
    yb = torch.randint(0, classes, (12,), generator=g)
    ref = copy.deepcopy(sal)
    ref.zero_grad()
    F.cross_entropy(ref(xb), yb).backward()
    sess = TrainStepSession(path, sal.state_dict())
    sess.step(xb, yb)
    new = sess.state_dict()
    for n, p in sal.named_parameters():
        _close(n, (p.detach().numpy() - np.asarray(new[n])) / lr, ref.get_parameter(n).grad,
               1e-5)


def test_bad_routed_form_is_a_clear_error(tmp_path):
    sal, x = _mlp(areas=4)
    with pytest.raises(SalcompileError, match="routed_form"):
        export_train_step(sal, (x,), tmp_path / "s.onnx", routed_form="sorted")
