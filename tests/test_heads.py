"""The heads: factorized projections, CNN maps as tokens, subject maps, the masked loss, the registry."""

import pytest
import torch

from blobenc import ConfigError
from blobenc.heads import FactorizedLinear, GroupLinearEncoder, SubjectLinear, create_head, list_heads
from blobenc.train.step import EmbeddedTargets, embedded_mse


def test_factorized_projection_equals_dense():
    proj = FactorizedLinear(n_tokens=7, in_channels=5, out_channels=3)
    torch.nn.init.normal_(proj.weight1)
    x = torch.randn(4, 7, 5)
    dense = proj.weight1[:, :, None] * proj.weight2[:, None, :]  # (K, L, C)
    torch.testing.assert_close(proj(x), torch.einsum("blc,klc->bk", x, dense))


def test_cnn_maps_are_tokens():
    enc = GroupLinearEncoder([(6, 4, 4)], n_subjects=2, n_vertices=10, hidden_dim=8, proj_dim=5, dropout=0)
    x = torch.randn(3, 6, 4, 4)
    out = enc([x], torch.tensor([0, 1, 0]))
    assert out.shape == (3, 10)
    enc.eval()
    tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C): position-major, channels last
    torch.testing.assert_close(enc.feat_projs[0](x), enc.feat_projs[0](tokens))
    assert enc.feat_projs[0].proj.weight1.shape == (8, 16) and enc.feat_projs[0].proj.weight2.shape == (8, 6)


def test_subject_selection():
    layer = SubjectLinear(in_dim=4, out_dim=3, n_subjects=5)
    h = torch.randn(6, 4)
    subject = torch.tensor([0, 4, 2, 2, 1, 3])
    out = layer(h, subject)
    w = layer.fc.weight.view(5, 3, 4)
    b = layer.fc.bias.view(5, 3)
    for i, s in enumerate(subject.tolist()):
        torch.testing.assert_close(out[i], w[s] @ h[i] + b[s])


def embedded_loss(z, subject, target, weight, bias, masks):
    """The loss training uses, from group-space targets (zeros where a subject lacks a vertex)."""
    y = (target - bias) * masks[subject]
    gram = torch.stack([weight.T @ (weight * m[:, None]) for m in masks])
    targets = EmbeddedTargets(y @ weight, (y * y).sum(1), gram, masks.sum(1))
    return embedded_mse(z, subject, targets.r, targets.q, targets)


def test_embedded_loss_is_the_masked_group_mse_and_ignores_missing_vertices():
    torch.manual_seed(0)
    n_vertices, p = 50, 7
    weight, bias = torch.randn(n_vertices, p, dtype=torch.float64), torch.randn(n_vertices, dtype=torch.float64)
    masks = torch.ones(3, n_vertices, dtype=torch.float64)
    masks[1, 10:25] = 0  # subject 1 lacks 15 vertices
    subject = torch.tensor([0, 1, 1, 2, 1])
    target = torch.randn(5, n_vertices, dtype=torch.float64) * masks[subject]
    z = torch.randn(5, p, dtype=torch.float64, requires_grad=True)
    loss = embedded_loss(z, subject, target, weight, bias, masks)
    mask = masks[subject].bool()
    z_ref = z.detach().clone().requires_grad_(True)
    reference = (((z_ref @ weight.T + bias) - target)[mask] ** 2).mean()  # masked MSE in group space
    torch.testing.assert_close(loss, reference)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    changed = target.clone()
    changed[1, 10:25] = 1e6  # garbage where the subject has no vertex
    assert embedded_loss(z, subject, changed, weight, bias, masks).item() == pytest.approx(loss.item())


def test_head_registry():
    assert "group_linear" in list_heads()
    with pytest.raises(ConfigError, match="head 'ridge9' is not registered; valid: group_linear"):
        create_head("ridge9")
