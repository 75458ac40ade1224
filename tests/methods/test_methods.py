"""Update rules: BiP (paper and reference variants), HYDRA, finetune, one-shot and IMP masks."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bip.pruning import masking
from bip.config import load_config
from bip.errors import BipError
from bip.pruning.layers import MaskedConv2d, MaskedLinear
from bip.methods.bilevel import BipPaper
from bip.methods.dense import Dense
from bip.methods.hydra import Hydra
from bip.methods.imp import Imp
from bip.methods.oneshot import OneShot
from bip.methods.registry import create_method
from bip.methods.reference import BipReference
from bip.models import create_model


def prune_cfg(*extra):
    return load_config([], ["run.stage=prune", "prune.layer_type=unstructured", *extra])


# -- BiP, paper variant: one iteration by hand in float64 -------------------------------------

def _softmax_ce_grad(out, y):
    p = torch.softmax(out, dim=1)
    return (p - F.one_hot(y, out.shape[1]).double()) / len(y)


def _grads_two_layer(x, y, z1, z2):
    """dL/dZ1, dL/dZ2 of mean CE(x Z1^T Z2^T), by matrix calculus."""
    h = x @ z1.T
    d_out = _softmax_ce_grad(h @ z2.T, y)
    return (d_out @ z2).T @ x, d_out.T @ h


def test_bip_paper_iteration_matches_hand_computation():
    torch.manual_seed(0)
    alpha, beta, gamma, lower_wd, upper_wd, k = 0.05, 0.3, 0.5, 0.01, 0.001, 0.5
    cfg = prune_cfg("prune.method=bip", "prune.score_init=magnitude", f"prune.k={k}",
                    f"bip.alpha={alpha}", f"bip.beta={beta}", f"bip.gamma={gamma}",
                    f"bip.lower_wd={lower_wd}", f"bip.upper_wd={upper_wd}", "train.epochs=10")
    model = nn.Sequential(MaskedLinear(3, 2, bias=False), MaskedLinear(2, 2, bias=False)).double()
    w1, w2 = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    x_t, x_v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y_t, y_v = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 0, 1, 1])

    method = BipPaper(cfg, model)
    method.step([(x_t, y_t), (x_v, y_v)], progress=0.0)

    # Expected, by hand. Initial mask: global magnitude top-5 of the 10 weights (scores = W).
    flat = torch.cat([w1.abs().flatten(), w2.abs().flatten()])
    keep = torch.zeros(10, dtype=torch.float64)
    keep[flat.topk(5).indices] = 1
    m1, m2 = keep[:6].view(2, 3), keep[6:].view(2, 2)
    # (1) lower level on V: one SGD step on theta with the mask fixed (first momentum step = SGD).
    g1, g2 = _grads_two_layer(x_v, y_v, w1 * m1, w2 * m2)
    w1n = w1 - alpha * (m1 * g1 + lower_wd * w1)
    w2n = w2 - alpha * (m2 * g2 + lower_wd * w2)
    # (2) upper level on T at the updated weights: g = dL/dZ, score gradient
    #     sign(S) * (W * g - (1/gamma) * M * g^2), one SGD step with lr beta.
    g1, g2 = _grads_two_layer(x_t, y_t, w1n * m1, w2n * m2)
    s1 = w1 - beta * (torch.sign(w1) * (w1n * g1 - m1 * g1 ** 2 / gamma) + upper_wd * w1)
    s2 = w2 - beta * (torch.sign(w2) * (w2n * g2 - m2 * g2 ** 2 / gamma) + upper_wd * w2)
    new_keep = torch.zeros(10, dtype=torch.float64)
    new_keep[torch.cat([s1.abs().flatten(), s2.abs().flatten()]).topk(5).indices] = 1

    for got, want in [(model[0].weight, w1n), (model[1].weight, w2n),
                      (model[0].scores, s1), (model[1].scores, s2)]:
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.cat([model[0].mask.flatten(), model[1].mask.flatten()]).double(), new_keep)


def test_bip_fused_steps_match_hand_computation():
    """bip.variant=fused, two steps through create_method (momentum and both weight decays on):
    one g = dL/dZ per step, at the current weights, feeds the weight step (M * g) and the score
    step (sign(S) * (W * g - (1/gamma) * M * g^2)), then one new mask."""
    torch.manual_seed(0)
    alpha, beta, gamma, lower_wd, upper_wd, mu, k = 0.05, 0.3, 0.5, 0.01, 0.001, 0.9, 0.5
    cfg = prune_cfg("prune.method=bip", "bip.variant=fused", "prune.score_init=magnitude",
                    f"prune.k={k}", f"bip.alpha={alpha}", f"bip.beta={beta}", f"bip.gamma={gamma}",
                    f"bip.lower_wd={lower_wd}", f"bip.upper_wd={upper_wd}", f"bip.momentum={mu}",
                    "optim.lr_schedule=constant", "train.epochs=10")
    model = nn.Sequential(MaskedLinear(3, 2, bias=False), MaskedLinear(2, 2, bias=False)).double()
    method = create_method(cfg, model)
    from bip.methods.fused import BipFused
    assert type(method) is BipFused and method.streams == 1

    w = [model[0].weight.detach().clone(), model[1].weight.detach().clone()]
    s = [x.clone() for x in w]  # magnitude init: S = W
    bw, bs = [torch.zeros_like(x) for x in w], [torch.zeros_like(x) for x in w]

    def top5(tensors):
        keep = torch.zeros(10, dtype=torch.float64)
        keep[torch.cat([t.abs().flatten() for t in tensors]).topk(5).indices] = 1
        return [keep[:6].view(2, 3), keep[6:].view(2, 2)]

    m = top5(s)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (4,), generator=g)
        method.step([(x, y)], progress=step / 10)
        # By hand: g by autograd on the masked weights Z = W * M, at the current W.
        z = [(wi * mi).requires_grad_() for wi, mi in zip(w, m)]
        loss = F.cross_entropy(x @ z[0].T @ z[1].T, y)
        gz = torch.autograd.grad(loss, z)
        for i in range(2):
            dw = m[i] * gz[i] + lower_wd * w[i]
            ds = torch.sign(s[i]) * (w[i] * gz[i] - m[i] * gz[i] ** 2 / gamma) + upper_wd * s[i]
            bw[i] = dw if step == 0 else mu * bw[i] + dw
            bs[i] = ds if step == 0 else mu * bs[i] + ds
            w[i], s[i] = w[i] - alpha * bw[i], s[i] - beta * bs[i]
        m = top5(s)
        for i in range(2):
            torch.testing.assert_close(model[i].weight.detach(), w[i], rtol=0, atol=1e-14)
            torch.testing.assert_close(model[i].scores.detach(), s[i], rtol=0, atol=1e-14)
            torch.testing.assert_close(model[i].mask.double(), m[i], rtol=0, atol=0)
    assert method.take_passes() == (8, 8)  # one forward and one backward per example


def test_bip_fused_differs_from_paper_only_by_where_g_is_taken():
    """With alpha = 0 the paper's upper level sees the same weights as the fused step, so on
    the same batch (V = T) the two variants give the same scores and masks (BN's running
    statistics aside: the paper variant runs two train-mode forwards per step)."""
    def run(variant):
        torch.manual_seed(0)
        cfg = prune_cfg("prune.method=bip", f"bip.variant={variant}", "prune.score_init=magnitude",
                        "prune.k=0.3", "bip.alpha=0", "bip.beta=2.0", "train.epochs=10")
        model = _small_model().double()
        method = create_method(cfg, model)
        for i in range(3):
            x, y = _batch(i)
            method.step([(x.double(), y)] * method.streams, i / 10)
        return {k: v.clone() for k, v in model.state_dict().items()}
    paper, fused = run("paper"), run("fused")
    for key in paper:
        if "running_" not in key and "num_batches" not in key:
            torch.testing.assert_close(fused[key], paper[key], rtol=0, atol=1e-12, msg=key)


def test_bip_gamma_inf_drops_the_implicit_term():
    cfg = prune_cfg("prune.method=bip", "bip.gamma=inf")
    assert BipPaper(cfg, nn.Sequential(MaskedLinear(3, 2))).ig_coeff == 0.0


# -- BiP, reference variant: the released code's quirks ----------------------------------------

def _ref_model():
    torch.manual_seed(1)
    return nn.Sequential(MaskedConv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), MaskedLinear(3, 4)).double()


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t, x_v = torch.randn(6, 2, 4, 4, generator=g).double(), torch.randn(6, 2, 4, 4, generator=g).double()
    return [(x_t, torch.randint(0, 4, (6,), generator=g)), (x_v, torch.randint(0, 4, (6,), generator=g))]


def _forward(x, p):
    """The reference model as a function of explicit tensors (train-mode BN)."""
    h = F.conv2d(x, p["conv_z"], padding=1)
    h = F.batch_norm(h, None, None, p["bn_w"], p["bn_b"], training=True)
    h = F.relu(h).mean(dim=(2, 3))
    return F.linear(h, p["fc_z"], p["fc_b"])


def _dz(x, y, w, m, extra):
    """dL/dZ for both masked layers and dL/d(bn_w, bn_b, fc_b), by autograd on leaves."""
    leaves = {"conv_z": (w["conv"] * m["conv"]), "fc_z": (w["fc"] * m["fc"]), **extra}
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    F.cross_entropy(_forward(x, leaves), y).backward()
    return {k: v.grad for k, v in leaves.items()}


def test_reference_iteration_zero_matches_restatement():
    """Iteration 0 without aliasing (kaiming scores, weights x 1/sqrt(k)), from the spec:
    A (lower) skips the scores (no grad slot yet); the mask optimizer B sees G = gM(1 - lr2 gB)
    with gB = gM on the same batch, and still decays W and b, whose zero-filled slots exist."""
    lr, lr2, wd, k, epochs = 0.1, 0.3, 0.01, 0.5, 4
    cfg = prune_cfg("prune.method=bip", "bip.variant=reference", "prune.score_init=kaiming",
                    f"prune.k={k}", f"optim.lr={lr}", f"optim.wd={wd}", f"bip.lr2={lr2}",
                    "bip.mask_lr=0.77", "bip.mask_lr_schedule=step", f"train.epochs={epochs}")
    model = _ref_model()
    conv, bn, fc = model[0], model[1], model[5]
    w0 = {"conv": conv.weight.detach() / math.sqrt(k), "fc": fc.weight.detach() / math.sqrt(k)}
    s = {"conv": conv.scores.detach().clone(), "fc": fc.scores.detach().clone()}
    bn_w, bn_b, fc_b = bn.weight.detach().clone(), bn.bias.detach().clone(), fc.bias.detach().clone()
    method = BipReference(cfg, model)
    method.on_epoch_start(0)
    batches = _batches()
    method.step(batches, 0.0)

    lr_a = lr * 0.5 * (1 + math.cos(math.pi * (0 - 1) / epochs))  # cosine with the (e - 1) quirk
    lr_b = lr  # step schedule, based on optim.lr, NOT bip.mask_lr (A3)
    flat = torch.cat([s["conv"].abs().flatten(), s["fc"].abs().flatten()])
    n_keep = flat.numel() - int((1 - k) * flat.numel())
    keep = torch.zeros_like(flat)
    keep[flat.topk(n_keep).indices] = 1
    m = {"conv": keep[:s["conv"].numel()].view_as(s["conv"]), "fc": keep[s["conv"].numel():].view_as(s["fc"])}
    # 1. A on V: W, b, BN move; scores have no slot yet.
    (x_t, y_t), (x_v, y_v) = batches
    g = _dz(x_v, y_v, w0, m, {"bn_w": bn_w, "bn_b": bn_b, "fc_b": fc_b})
    w_a = {n: w0[n] - lr_a * (m[n] * g[f"{n}_z"] + wd * w0[n]) for n in w0}
    bn_w_a, bn_b_a = bn_w - lr_a * (g["bn_w"] + wd * bn_w), bn_b - lr_a * (g["bn_b"] + wd * bn_b)
    fc_b_a = fc_b - lr_a * (g["fc_b"] + wd * fc_b)
    # 2-4. On T: gB = gM for scores and BN; G = g - lr2 * g^2; W and b get only B's weight decay.
    g = _dz(x_t, y_t, w_a, m, {"bn_w": bn_w_a, "bn_b": bn_b_a, "fc_b": fc_b_a})
    expect = {}
    for n in ("conv", "fc"):
        g_s = torch.sign(s[n]) * w_a[n] * g[f"{n}_z"]
        expect[f"{n}.scores"] = s[n] - lr_b * (g_s - lr2 * g_s ** 2 + wd * s[n])
        expect[f"{n}.weight"] = w_a[n] - lr_b * wd * w_a[n]
    for name, value, grad in (("bn.weight", bn_w_a, g["bn_w"]), ("bn.bias", bn_b_a, g["bn_b"])):
        expect[name] = value - lr_b * (grad - lr2 * grad ** 2 + wd * value)
    expect["fc.bias"] = fc_b_a - lr_b * wd * fc_b_a
    got = {"conv.scores": conv.scores, "fc.scores": fc.scores, "conv.weight": conv.weight,
           "fc.weight": fc.weight, "bn.weight": bn.weight, "bn.bias": bn.bias, "fc.bias": fc.bias}
    for name, want in expect.items():
        torch.testing.assert_close(got[name].detach(), want, rtol=0, atol=1e-13, msg=name)
    # A has no state for the scores after iteration 0; it decays them from iteration 1 on.
    assert all(p not in method.lower.state for p in method.scores)
    method.step(_batches(1), 0.5)
    assert all("momentum_buffer" in method.lower.state[p] for p in method.scores)


# -- the reference variant against an independent restatement of the released code, bitwise --------
# Written from the spec (shared/reference/bip-reference-code.md, sections 2, 4.1, 4.2, 4.6) in
# the released code's op order: masks recomputed at every forward by a sort of |popup_scores|
# with floor((1 - k) n) units zeroed (global for unstructured, in the model's forward; per conv
# for filter / channel with nested L2 norms), w = weight * adj, the ResNet-s head pooling with
# avg_pool2d, requires_grad toggled per pass, zero-filled grads (PyTorch 1.x), grad vectors over
# all parameters, G = gM + (-lr2 * gM) * gB, per-epoch lrs with np.cos((e - 1) / E * pi) and
# lr * 0.1 steps.

class _Subnet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, k, mode):
        if mode == "unstructured":
            rank, n, shape = a.flatten(), a.numel(), None
        elif mode == "filter":
            rank, n, shape = torch.norm(a.flatten(start_dim=1), p=2, dim=1), a.shape[0], (-1, 1, 1, 1)
        else:
            rank, n, shape = torch.norm(torch.norm(a, p=2, dim=[2, 3]), p=2, dim=0), a.shape[1], (1, -1, 1, 1)
        _, idx = rank.sort()
        keep = torch.ones_like(rank)
        keep[idx[:int((1 - k) * n)]] = 0
        return keep.view_as(a) if shape is None else keep.view(shape).expand_as(a).clone()

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _RelConv(nn.Conv2d):
    def __init__(self, cin, cout, stride, mode, k):
        super().__init__(cin, cout, 3, stride, 1, bias=False)
        self.popup_scores = nn.Parameter(torch.zeros_like(self.weight))
        self.mode, self.k, self.w = mode, k, None

    def forward(self, x):
        if self.mode != "unstructured":
            self.w = self.weight * _Subnet.apply(self.popup_scores.abs(), self.k, self.mode)
        return F.conv2d(x, self.w, None, self.stride, self.padding)


class _RelLinear(nn.Linear):
    def __init__(self, cin, cout):
        super().__init__(cin, cout)
        self.popup_scores = nn.Parameter(torch.zeros_like(self.weight))
        self.w = None

    def forward(self, x):
        return F.linear(x, self.w, self.bias)


class _RelBlock(nn.Module):
    def __init__(self, cin, cout, stride, mode, k):
        super().__init__()
        self.conv1, self.bn1 = _RelConv(cin, cout, stride, mode, k), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _RelConv(cout, cout, 1, mode, k), nn.BatchNorm2d(cout)
        self.pad = cout // 4 if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out)


class _RelResNet20s(nn.Module):
    def __init__(self, mode, k):
        super().__init__()
        self.mode, self.k = mode, k
        self.conv1, self.bn1 = _RelConv(3, 16, 1, mode, k), nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            stage = [_RelBlock(cin, cout, stride, mode, k)] + [_RelBlock(cout, cout, 1, mode, k) for _ in range(2)]
            blocks.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3 = blocks
        self.fc = _RelLinear(64, 10) if mode == "unstructured" else nn.Linear(64, 10)

    def forward(self, x):
        if self.mode == "unstructured":  # one global mask, sliced back to every weight
            scored = [m for m in self.modules() if hasattr(m, "popup_scores")]
            adj = _Subnet.apply(torch.cat([m.popup_scores.view(-1) for m in scored]).abs(), self.k, self.mode)
            at = 0
            for m in scored:
                m.w = m.weight * adj[at:at + m.weight.numel()].view_as(m.weight)
                at += m.weight.numel()
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        out = F.avg_pool2d(out, out.size()[3])
        return self.fc(out.view(out.size(0), -1))


def _released_steps(model, epochs, batches, lr, lr2, wd, aliased):
    scores = [m.popup_scores for m in model.modules() if hasattr(m, "popup_scores")]
    weights = [p for m in model.modules() if not isinstance(m, nn.BatchNorm2d)
               for n, p in m.named_parameters(recurse=False) if n in ("weight", "bias")]
    if aliased:  # --scaled-score-init: one storage
        for m in model.modules():
            if hasattr(m, "popup_scores"):
                m.popup_scores.data = m.weight.data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd, foreach=False)
    mask_opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=wd, foreach=False)

    def trainable(s, w):
        for p in scores:
            p.requires_grad_(s)
        for p in weights:
            p.requires_grad_(w)

    def grad_vec():
        return torch.cat([p.grad.view(-1).detach() for p in model.parameters()])

    for epoch, epoch_batches in enumerate(batches):
        for group in opt.param_groups:  # cosine with the (e - 1) offset
            group["lr"] = lr * 0.5 * (1 + np.cos((epoch - 1) / epochs * np.pi))
        for group in mask_opt.param_groups:  # the generic step schedule, base optim.lr
            group["lr"] = lr * 0.1 if epoch >= 0.5 * epochs else lr
        for (x_t, y_t), (x_v, y_v) in epoch_batches:
            trainable(False, True)
            loss = F.cross_entropy(model(x_v), y_v)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            trainable(True, True)
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x_t), y_t).backward()
            g_b = grad_vec()
            trainable(True, False)
            mask_opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x_t), y_t).backward()
            ig = -lr2 * grad_vec() * g_b
            at = 0
            for p in model.parameters():
                p.grad.copy_(p.grad + ig[at:at + p.numel()].view_as(p))
                at += p.numel()
            mask_opt.step()
            with torch.no_grad():
                model(x_t)  # the logging forward


def _ours_and_released(layer_type: str, k: float):
    """Our float64 resnet20s with random scores, and the released model holding the same
    tensors (strict load: every weight, score and BN tensor is matched by name)."""
    torch.manual_seed(0)
    ours = create_model("resnet20s", 10, layer_type).double()
    with torch.no_grad():
        for _, m in masking.masked_layers(ours):
            m.scores.normal_()
    released = _RelResNet20s(layer_type, k).double()
    released.load_state_dict({n.replace("scores", "popup_scores"): v for n, v in ours.state_dict().items()
                              if not n.endswith("mask")})
    return ours, released


@pytest.mark.parametrize("aliased", [True, False], ids=["scaled-score-init", "random-scores"])
@pytest.mark.parametrize("layer_type", ["unstructured", "filter", "channel"])
def test_reference_variant_is_bitwise_the_released_step(layer_type, aliased):
    """float64, 6 iterations over 2 epochs of resnet20s, k = 0.8: every weight, score and BN
    tensor equal to the last bit (the channel case drifted to 1e-11 before avg_pool2d, the
    released IG op order and its lr arithmetic were matched)."""
    k, lr, lr2, wd, epochs = 0.8, 0.1, 0.1, 1e-4, 2
    ours, released = _ours_and_released(layer_type, k)
    if not aliased:  # released train.py: weights x 1/sqrt(k) when scores are not the weights
        with torch.no_grad():
            for m in released.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.data = 1 / math.sqrt(k) * m.weight.data
    cfg = prune_cfg(f"prune.layer_type={layer_type}", "prune.method=bip", "bip.variant=reference",
                    f"prune.score_init={'magnitude' if aliased else 'kaiming'}", f"prune.k={k}",
                    f"optim.lr={lr}", f"optim.wd={wd}", f"bip.lr2={lr2}", "bip.mask_lr=0.5",
                    "bip.mask_lr_schedule=step", f"train.epochs={epochs}")
    method = BipReference(cfg, ours)
    g = torch.Generator().manual_seed(1)
    batches = [[tuple((torch.randn(4, 3, 8, 8, generator=g).double(), torch.randint(0, 10, (4,), generator=g))
                      for _ in range(2)) for _ in range(3)] for _ in range(epochs)]
    _released_steps(released, epochs, batches, lr, lr2, wd, aliased)
    for epoch, epoch_batches in enumerate(batches):
        method.on_epoch_start(epoch)
        for i, batch in enumerate(epoch_batches):
            method.step(list(batch), epoch + i / 3)
    want = {n.replace("popup_scores", "scores"): v for n, v in released.state_dict().items()}
    for name, value in ours.state_dict().items():
        if not name.endswith("mask"):
            assert torch.equal(value, want[name]), (name, (value - want[name]).abs().max().item())


def _released_hydra_steps(model, epochs, batches, lr, wd, aliased, k):
    """The released ``--trainer base`` prune run: prepare_model freezes weights and biases (not
    BN), the score init aliases (or rescales the weights), ONE SGD over all parameters, the
    cosine (e - 1) lr per epoch, forward -> zero_grad (zero-filled) -> backward -> step."""
    for m in model.modules():
        if not isinstance(m, nn.BatchNorm2d):
            for name, p in m.named_parameters(recurse=False):
                p.requires_grad_(name == "popup_scores")
        if hasattr(m, "popup_scores") and aliased:
            m.popup_scores.data = m.weight.data
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and not aliased:
            m.weight.data = 1 / math.sqrt(k) * m.weight.data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd, foreach=False)
    for epoch, epoch_batches in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos((epoch - 1) / epochs * np.pi))
        for x, y in epoch_batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()


@pytest.mark.parametrize("aliased", [True, False], ids=["scaled-score-init", "random-scores"])
@pytest.mark.parametrize("layer_type", ["unstructured", "filter", "channel"])
def test_hydra_reference_variant_is_bitwise_the_released_run(layer_type, aliased):
    k, lr, wd, epochs = 0.1, 0.1, 5e-4, 2
    ours, released = _ours_and_released(layer_type, k)
    cfg = prune_cfg(f"prune.layer_type={layer_type}", "prune.method=hydra", "prune.variant=reference",
                    f"prune.score_init={'magnitude' if aliased else 'kaiming'}", f"prune.k={k}",
                    f"optim.lr={lr}", f"optim.wd={wd}", f"train.epochs={epochs}")
    method = create_method(cfg, ours)
    g = torch.Generator().manual_seed(2)
    batches = [[(torch.randn(4, 3, 8, 8, generator=g).double(), torch.randint(0, 10, (4,), generator=g))
                for _ in range(3)] for _ in range(epochs)]
    _released_hydra_steps(released, epochs, batches, lr, wd, aliased, k)
    for epoch, epoch_batches in enumerate(batches):
        method.on_epoch_start(epoch)
        for i, batch in enumerate(epoch_batches):
            method.step([batch], epoch + i / 3)
    want = {n.replace("popup_scores", "scores"): v for n, v in released.state_dict().items()}
    for name, value in ours.state_dict().items():
        if not name.endswith("mask"):
            assert torch.equal(value, want[name]), (name, (value - want[name]).abs().max().item())
    if aliased:  # the "frozen" weights moved with the scores
        conv = masking.masked_layers(ours)[0][1]
        assert conv.weight.data_ptr() == conv.scores.data_ptr()


def test_hydra_variants_keep_their_counts():
    """k = 0.1 filter pruning of resnet20s: the released rule zeroes floor(0.9 n) filters per conv
    (7 x 2 + 6 x 4 + 6 x 7 = 80 kept), ours keeps round(0.1 n) (7 x 2 + 6 x 3 + 6 x 6 = 68)."""
    kept = {}
    for variant in ("paper", "reference"):
        model = create_model("resnet20s", 10, "filter")
        create_method(prune_cfg("prune.layer_type=filter", "prune.k=0.1", f"prune.variant={variant}"), model)
        kept[variant] = masking.sparsity_report(model)["kept"]
    assert kept == {"paper": 68, "reference": 80}


def test_reference_scaled_init_aliases_scores_and_weights():
    cfg = prune_cfg("prune.method=bip", "bip.variant=reference", "prune.score_init=magnitude",
                    "prune.k=0.5", "train.epochs=2")
    model = _ref_model()
    conv = model[0]
    method = BipReference(cfg, model)
    assert conv.scores.data_ptr() == conv.weight.data_ptr()
    before = conv.scores.detach().clone()
    method.on_epoch_start(0)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    method.step(_batches(), 0.0)
    # a weight update moved the scores too: one storage
    assert not torch.equal(conv.scores.detach(), before)
    assert torch.equal(conv.scores.detach(), conv.weight.detach())
    assert len(forwards) == 4  # V, T, T and the logging forward on T


def test_reference_lr_schedules():
    cfg = prune_cfg("prune.method=bip", "bip.variant=reference", "optim.lr=0.1",
                    "bip.mask_lr=0.5", "bip.mask_lr_schedule=step", "train.epochs=100")
    method = BipReference(cfg, _ref_model())
    method.on_epoch_start(0)
    assert method.lower.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(-math.pi / 100)))
    assert method.upper.param_groups[0]["lr"] == pytest.approx(0.1)
    method.on_epoch_start(50)
    assert method.upper.param_groups[0]["lr"] == pytest.approx(0.01)
    method.on_epoch_start(99)
    assert method.lower.param_groups[0]["lr"] > 0


# -- HYDRA, finetune, one-shot, IMP -------------------------------------------------------------

def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(MaskedConv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), MaskedLinear(8, 5))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


@pytest.mark.parametrize("method_name", ["hydra", "bip"])
def test_mask_recomputed_exactly_once_per_step(method_name, monkeypatch):
    model = _small_model()
    method = create_method(prune_cfg(f"prune.method={method_name}", "prune.k=0.3"), model)
    calls = []
    refresh = masking.refresh_masks
    monkeypatch.setattr(masking, "refresh_masks", lambda *a, **k: (calls.append(1), refresh(*a, **k)))
    for i in range(3):
        method.step([_batch(i), _batch(i + 10)][:method.streams], i / 3)
    assert len(calls) == 3


def _nm_model():
    torch.manual_seed(0)
    return nn.Sequential(MaskedConv2d(3, 8, 3, padding=1, bias=False, granularity="nm"), nn.BatchNorm2d(8),
                         nn.ReLU(), MaskedConv2d(8, 8, 3, padding=1, bias=False, granularity="nm"),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), MaskedLinear(8, 5, granularity="nm"))


def _groups(mask, m):
    """Groups of m consecutive weights along the input dimension ([out, kh, kw, in] for convs)."""
    return (mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask).reshape(-1, m)


@pytest.mark.parametrize("method_name", ["hydra", "bip", "omp"])
def test_nm_pattern_exact_after_training_steps(method_name):
    model = _nm_model()
    cfg = load_config([], ["run.stage=prune", "prune.layer_type=nm", f"prune.method={method_name}",
                           "prune.score_init=magnitude", "optim.lr=100", "bip.beta=100"])  # masks move
    assert cfg.prune.k == 0.5  # k of an nm mask is n / m
    method = create_method(cfg, model)
    before = [m.mask.clone() for m in (model[3], model[6])]
    for i in range(0 if method.one_shot else 4):
        method.step([_batch(i), _batch(i + 10)][:method.streams], i / 4)
    for layer in (model[3], model[6]):
        assert torch.all(_groups(layer.mask, 4).sum(1) == 2)
    assert model[0].mask.all()  # 3 input channels: not a multiple of 4, left dense
    if method_name == "omp":  # magnitude: the 2 largest |W| of every group
        w, kept = _groups(model[3].weight.detach().abs(), 4), _groups(model[3].mask, 4)
        assert torch.all((w * kept).max(1).values >= w.max(1).values)
        smallest_kept = w.masked_fill(~kept, float("inf")).min(1).values
        assert torch.all(smallest_kept >= w.masked_fill(kept, -1).max(1).values)
    else:
        assert any(not torch.equal(b, m.mask) for b, m in zip(before, (model[3], model[6])))


@pytest.mark.parametrize("method_name", ["hydra", "bip"])
def test_layer_scope_after_training_steps(method_name):
    model = _small_model()
    cfg = prune_cfg(f"prune.method={method_name}", "prune.k=0.3", "prune.scope=layer")
    method = create_method(cfg, model)
    for i in range(3):
        method.step([_batch(i), _batch(i + 10)][:method.streams], i / 3)
    for _, m in masking.masked_layers(model):
        assert int(m.mask.sum()) == masking.keep_count(0.3, m.mask.numel())


def test_hydra_trains_scores_and_bn_not_weights():
    model = _small_model()
    weights = [m.weight.detach().clone() for _, m in masking.masked_layers(model)]
    scores = [m.scores.detach().clone() for _, m in masking.masked_layers(model)]
    bn = model[1].weight.detach().clone()
    method = Hydra(prune_cfg("prune.method=hydra", "prune.k=0.3"), model)
    method.step([_batch()], 0.0)
    for w, (_, m) in zip(weights, masking.masked_layers(model)):
        assert torch.equal(w, m.weight)
    assert any(not torch.equal(s, m.scores) for s, (_, m) in zip(scores, masking.masked_layers(model)))
    assert not torch.equal(bn, model[1].weight)


def test_finetune_keeps_mask_and_zeros():
    model = _small_model()
    OneShot(prune_cfg("prune.method=omp", "prune.k=0.3"), model)
    masks = [m.mask.clone() for _, m in masking.masked_layers(model)]
    cfg = load_config([], ["run.stage=finetune", "prune.layer_type=unstructured", "prune.k=0.3"])
    method = Dense(cfg, model)
    for i in range(3):
        method.step([_batch(i)], i / 3)
    for mask, (_, m) in zip(masks, masking.masked_layers(model)):
        assert torch.equal(mask, m.mask)
        assert torch.all(m.weight[mask == 0] == 0)  # exactly zero, not small
        assert m.weight[mask == 1].abs().sum() > 0
        assert m.scores.grad is None


def test_omp_is_global_magnitude_and_random_is_not():
    model = _small_model()
    OneShot(prune_cfg("prune.method=omp", "prune.k=0.25"), model)
    weights = torch.cat([m.weight.abs().flatten() for _, m in masking.masked_layers(model)])
    kept = torch.cat([m.mask.flatten() for _, m in masking.masked_layers(model)]).bool()
    assert weights[kept].min() >= weights[~kept].max()
    torch.manual_seed(3)
    OneShot(prune_cfg("prune.method=random", "prune.k=0.25"), model)
    kept_random = torch.cat([m.mask.flatten() for _, m in masking.masked_layers(model)]).bool()
    assert kept_random.sum() == kept.sum() and not torch.equal(kept_random, kept)


def test_imp_rounds_prune_the_remainder_and_rewind():
    from bip.methods import imp_levels as imp
    assert imp.rounds_for(0.8, 0.2) == 1 and imp.rounds_for(0.64, 0.2) == 2 and imp.rounds_for(0.1, 0.2) == 11
    assert imp.rounds_for(0.512, 0.2) == 3  # 0.8 ** 3 rounds to 0.5120000000000001
    series = imp.densities(0.3, 0.2)
    assert series[:3] == [0.8, 0.64, 0.512] and series[-1] == 0.3 and len(series) == 6
    assert imp.round_of(0.5, series) == 4 and imp.round_of(0.64, series) == 2
    model = _small_model()
    rewind = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    total = sum(m.mask.numel() for _, m in masking.masked_layers(model))
    masks = []
    for r, (before, density) in enumerate([(1.0, 0.8), (0.8, 0.64)]):  # round r + 1, one run each
        cfg = prune_cfg("prune.method=imp", f"prune.k={density}", "train.epochs=2")
        method = Imp(cfg, model, imp.Source(before, r, rewind))
        assert method.epochs() == 2 and method.round == r + 1
        kept = sum(int(m.mask.sum()) for _, m in masking.masked_layers(model))
        assert kept == round(density * total)
        conv = masking.masked_layers(model)[0][1]
        torch.testing.assert_close(conv.weight, (rewind["0.weight"]) * conv.mask)  # rewound
        method.step([_batch(r)], 0.0)
        masks.append(conv.mask.clone())
    assert bool((masks[1] <= masks[0]).all())  # nested: a later round only removes
    cfg = prune_cfg("prune.method=imp", "prune.k=0.5", "train.epochs=2")
    with pytest.raises(BipError, match="prunes more than prune.imp_rate=0.2"):
        Imp(cfg, _small_model(), imp.Source(0.8, 1, rewind))
    with pytest.raises(BipError, match="must be below its source's density"):
        Imp(prune_cfg("prune.method=imp", "prune.k=0.8"), _small_model(), imp.Source(0.8, 1, rewind))
