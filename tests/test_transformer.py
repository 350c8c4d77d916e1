"""Tests of codetr.transformer.deformable: layer shapes, look-forward-twice gradients, two-stage selection, forward_aux, init, keys."""
import math

import pytest
import torch
from torch import nn

from codetr.ops.msda import MSDeformAttn
from codetr.transformer.position import SinePositionalEncoding, make_pad_masks, pad_mask_from_sizes
from codetr.transformer.deformable import (CoDeformableTransformer, DeformableDecoder, DeformableDecoderLayer,
                                DeformableEncoderLayer, flatten_feature_levels)

C, M, L, P, K = 32, 2, 2, 2, 3
LEVELS = [(8, 8), (4, 4)]
S = sum(h * w for h, w in LEVELS)


def mlp(c=C):
    return nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, 4))


def small(num_dec=2, **kw):
    torch.manual_seed(0)
    return CoDeformableTransformer(C, M, L, P, ffn_dims=64, num_encoder_layers=1, num_decoder_layers=num_dec, **kw)


def branches(n):
    return nn.ModuleList([nn.Linear(C, K) for _ in range(n)]), nn.ModuleList([mlp() for _ in range(n)])


def inputs(B=2, sizes=((64, 64), (64, 40))):
    torch.manual_seed(1)
    feats = [torch.randn(B, C, h, w) for h, w in LEVELS]
    masks = make_pad_masks(pad_mask_from_sizes(list(sizes)[:B], (64, 64)), LEVELS)
    pe = SinePositionalEncoding(C // 2, normalize=True, offset=-0.5)
    return feats, masks, [pe(m) for m in masks]


def run(tr, Q=6, B=2):
    feats, masks, pos = inputs(B)
    cls_b, reg_b = branches(tr.decoder.num_layers + 1)
    return tr(feats, masks, pos, torch.randn(Q, C), cls_b, reg_b), cls_b, reg_b


@pytest.mark.parametrize("B,Sq", [(1, 5), (3, 17)])
def test_encoder_layer_shapes_and_padding_invariance(B, Sq):
    layer = DeformableEncoderLayer(C, M, 1, P, ffn_dims=64)
    shapes, starts = torch.tensor([[Sq, 1]]), torch.tensor([0])
    src, pos = torch.randn(B, Sq, C), torch.randn(B, Sq, C)
    ref = torch.rand(B, Sq, 1, 2)
    pad = torch.zeros(B, Sq, dtype=torch.bool)
    out = layer(src, pos, ref, shapes, starts, pad)
    assert out.shape == (B, Sq, C)
    torch.testing.assert_close(out, layer(src, pos, ref, shapes, starts, None))


def test_decoder_layer_mask_and_shapes():
    layer = DeformableDecoderLayer(C, M, L, P, ffn_dims=64)
    q, qp, mem = torch.randn(2, 5, C), torch.randn(2, 5, C), torch.randn(2, S, C)
    ref = torch.rand(2, 5, L, 4)
    shapes, starts = torch.tensor(LEVELS), torch.tensor([0, 64])
    out = layer(q, qp, ref, mem, shapes, starts, None)
    assert out.shape == (2, 5, C)
    # blocking every other query (keeping the diagonal) changes the result: the mask reaches the self-attention
    mask = ~torch.eye(5, dtype=torch.bool)
    assert not torch.allclose(out, layer(q, qp, ref, mem, shapes, starts, None, mask))


def test_decoder_look_forward_twice_gradients():
    torch.manual_seed(0)
    dec = DeformableDecoder(3, embed_dims=C, num_heads=M, num_levels=L, num_points=P, ffn_dims=64)
    regs = nn.ModuleList([mlp() for _ in range(3)])
    mem = torch.randn(2, S, C)
    hs, refs = dec(torch.randn(2, 5, C), torch.randn(2, 5, C), torch.rand(2, 5, 4) * 0.5 + 0.25, mem,
                   torch.tensor(LEVELS), torch.tensor([0, 64]), torch.ones(2, L, 2), None, regs)
    assert hs.shape == (3, 2, 5, C) and refs.shape == (3, 2, 5, 4)
    for l in (1, 2):  # layers after 0 ran on detached references: no gradient into earlier box branches
        for j in range(l):
            assert torch.autograd.grad(hs[l].sum(), regs[j][-1].weight, allow_unused=True, retain_graph=True)[0] is None
    # the returned references keep their graph: r_{l+1} depends on reg_branches[l]
    g = torch.autograd.grad(refs[1].sum(), [regs[1][-1].weight, regs[0][-1].weight], allow_unused=True)
    assert g[0].abs().sum() > 0 and (g[1] is None or g[1].abs().sum() == 0)  # r_2 = sigmoid(D_1 + logit(sg(r_1)))
    # the value is consistent: r_{l+1} = sigmoid(reg_l(h_l) + logit(r_l))
    from codetr.ops.box_ops import inverse_sigmoid
    torch.testing.assert_close(refs[1], (regs[1](hs[1]) + inverse_sigmoid(refs[0])).sigmoid())


def test_decoder_without_refinement_keeps_references():
    dec = DeformableDecoder(2, embed_dims=C, num_heads=M, num_levels=L, num_points=P, ffn_dims=64)
    ref = torch.rand(1, 4, 4)
    _, refs = dec(torch.randn(1, 4, C), torch.randn(1, 4, C), ref, torch.randn(1, S, C), torch.tensor(LEVELS),
                  torch.tensor([0, 64]), torch.ones(1, L, 2), None, None)
    torch.testing.assert_close(refs, ref[None].expand(2, 1, 4, 4))


def test_flatten_feature_levels():
    feats, masks, pos = inputs()
    level_embeds = torch.randn(L, C)
    src, mask, p, shapes, starts = flatten_feature_levels(feats, masks, pos, level_embeds)
    assert src.shape == (2, S, C) and mask.shape == (2, S) and p.shape == (2, S, C)
    assert shapes.tolist() == [list(s) for s in LEVELS] and starts.tolist() == [0, 64]
    torch.testing.assert_close(src[1, 64 + 2 * 4 + 3], feats[1][1, :, 2, 3])  # level-major, row-major
    torch.testing.assert_close(p[0, 5], pos[0][0, :, 0, 5] + level_embeds[0])
    torch.testing.assert_close(p[0, 70], pos[1][0, :, 1, 2] + level_embeds[1])
    with pytest.raises(ValueError, match="one entry per level"):
        flatten_feature_levels(feats[:1], masks, pos, level_embeds)


def test_transformer_shapes_and_two_stage_selection():
    tr = small()
    o, cls_b, reg_b = run(tr, Q=6)
    assert o.hs.shape == (2, 2, 6, C) and o.inter_references.shape == (2, 2, 6, 4)
    assert o.init_reference.shape == (2, 6, 4) and not o.init_reference.requires_grad
    assert o.enc_outputs_class.shape == (2, S, K) and o.enc_outputs_coord_unact.shape == (2, S, 4)
    assert o.memory.shape == (2, S, C) and o.memory_pad_mask.shape == (2, S) and o.valid_ratios.shape == (2, L, 2)
    # top-k on class channel 0, and the references are the selected proposals' boxes
    top = o.enc_outputs_class[..., 0].topk(6, dim=1).indices
    assert torch.equal(o.topk_indices, top)
    sel = o.enc_outputs_coord_unact.gather(1, top[..., None].expand(2, 6, 4)).sigmoid()
    torch.testing.assert_close(o.init_reference, sel)
    # padded tokens propose +inf boxes; the proposal branch is the last one
    assert o.enc_outputs_coord_unact[1][o.memory_pad_mask[1]].isinf().all()
    assert torch.isfinite(o.enc_outputs_coord_unact[0]).any()


def test_mixed_selection_content_is_query_embed():
    """Two different query_embed tensors change the decoder output but not the selection (content only)."""
    tr = small()
    feats, masks, pos = inputs()
    cls_b, reg_b = branches(3)
    q1, q2 = torch.randn(6, C), torch.randn(6, C)
    o1, o2 = tr(feats, masks, pos, q1, cls_b, reg_b), tr(feats, masks, pos, q2, cls_b, reg_b)
    assert torch.equal(o1.topk_indices, o2.topk_indices)
    torch.testing.assert_close(o1.init_reference, o2.init_reference)
    assert not torch.allclose(o1.hs, o2.hs)


def test_batched_equals_one_by_one():
    tr = small().eval()
    feats, masks, pos = inputs()
    cls_b, reg_b = branches(3)
    qe = torch.randn(6, C)
    full = tr(feats, masks, pos, qe, cls_b, reg_b)
    for b in range(2):
        one = tr([f[b:b + 1] for f in feats], [m[b:b + 1] for m in masks], [p[b:b + 1] for p in pos], qe, cls_b, reg_b)
        torch.testing.assert_close(one.hs[:, 0], full.hs[:, b], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(one.memory[0], full.memory[b], atol=1e-5, rtol=1e-4)


def test_too_few_tokens_for_queries():
    tr = small()
    with pytest.raises(ValueError, match="encoder tokens"):
        run(tr, Q=S + 1)


def test_forward_aux_shapes_gradients_and_head_scalar():
    tr = small()
    o, _, reg_b = run(tr)
    coords = torch.rand(2, 5, 4) * 0.5 + 0.25
    feats = torch.randn(2, 5, C, requires_grad=True)
    hs, refs = tr.forward_aux(o, coords, feats, reg_b, head_index=0)
    assert hs.shape == (2, 2, 5, C) and refs.shape == (2, 2, 5, 4)
    params = [o.memory, feats, tr.head_pos_embed.weight, tr.aux_pos_trans[0].weight, tr.pos_feats_trans[0].weight,
              tr.encoder.layers[0].linear1.weight]
    grads = torch.autograd.grad(hs.sum(), params, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    g = torch.autograd.grad(hs.sum(), [tr.aux_pos_trans[1].weight, tr.head_pos_embed.weight], allow_unused=True)
    assert g[0] is None and g[1][1].item() == 0 and g[1][0].item() != 0  # only head 0's modules are used
    with pytest.raises(ValueError, match="head_index"):
        tr.forward_aux(o, coords, feats, reg_b, head_index=2)
    with pytest.raises(ValueError, match="coords_cxcywh"):
        tr.forward_aux(o, coords[0], feats, reg_b, head_index=0)


def test_forward_aux_query_construction():
    """query_pos = first half of LN(Linear(pe)) + head scalar; query = second half + LN(Linear(feats)) (spec 3.3)."""
    from codetr.ops.box_ops import inverse_sigmoid
    from codetr.transformer.position import proposal_pos_embed
    tr = small()
    o, _, reg_b = run(tr)
    coords, feats = torch.rand(2, 5, 4) * 0.5 + 0.25, torch.randn(2, 5, C)
    captured = {}
    layer0 = tr.decoder.layers[0]
    hook = layer0.register_forward_pre_hook(lambda m, args: captured.update(q=args[0], qp=args[1], ref=args[2]))
    tr.forward_aux(o, coords, feats, reg_b, head_index=1)
    hook.remove()
    out = tr.aux_pos_trans_norm[1](tr.aux_pos_trans[1](proposal_pos_embed(inverse_sigmoid(coords), C // 2)))
    torch.testing.assert_close(captured["qp"], out[..., :C] + tr.head_pos_embed.weight[1])
    torch.testing.assert_close(captured["q"], out[..., C:] + tr.pos_feats_norm[1](tr.pos_feats_trans[1](feats)))
    ratios = torch.cat([o.valid_ratios, o.valid_ratios], -1)[:, None]
    torch.testing.assert_close(captured["ref"], coords[:, :, None] * ratios)


def test_plain_deformable_detr_has_no_aux_modules():
    tr = small(num_co_heads=0)
    keys = tr.state_dict().keys()
    assert not any(k.startswith(("head_pos_embed", "aux_pos_trans", "pos_feats")) for k in keys)


def test_init():
    torch.manual_seed(0)
    tr = CoDeformableTransformer()
    assert tr.head_pos_embed.weight.abs().max() <= math.sqrt(6 / 3)  # xavier on the [2, 1] weight
    for m in tr.modules():
        if isinstance(m, MSDeformAttn):  # the MSDA init ran after xavier
            assert m.sampling_offsets.weight.abs().sum() == 0 and m.attention_weights.weight.abs().sum() == 0
            assert m.sampling_offsets.bias.abs().max() == 4  # (point index + 1) steps along the head direction
    bound = math.sqrt(6 / (256 + 2048))
    assert tr.encoder.layers[0].linear1.weight.abs().max() <= bound  # xavier-uniform, not PyTorch's default
    assert tr.level_embeds.abs().max() > 1.0 and 0.8 < tr.level_embeds.std() < 1.2  # N(0, 1)
    assert tr.enc_output.bias.abs().sum() > 0  # biases keep PyTorch's default


OFFICIAL_TRANSFORMER_SHAPES = {
    "level_embeds": (4, 256),
    "enc_output.weight": (256, 256), "enc_output.bias": (256,),
    "enc_output_norm.weight": (256,), "enc_output_norm.bias": (256,),
    "pos_trans.weight": (512, 512), "pos_trans.bias": (512,),
    "pos_trans_norm.weight": (512,), "pos_trans_norm.bias": (512,),
    "head_pos_embed.weight": (2, 1),
    **{f"aux_pos_trans.{i}.weight": (512, 512) for i in range(2)}, **{f"aux_pos_trans.{i}.bias": (512,) for i in range(2)},
    **{f"aux_pos_trans_norm.{i}.{p}": (512,) for i in range(2) for p in ("weight", "bias")},
    **{f"pos_feats_trans.{i}.weight": (256, 256) for i in range(2)}, **{f"pos_feats_trans.{i}.bias": (256,) for i in range(2)},
    **{f"pos_feats_norm.{i}.{p}": (256,) for i in range(2) for p in ("weight", "bias")},
}
MSDA_SHAPES = {"sampling_offsets.weight": (256, 256), "sampling_offsets.bias": (256,),
               "attention_weights.weight": (128, 256), "attention_weights.bias": (128,),
               "value_proj.weight": (256, 256), "value_proj.bias": (256,),
               "output_proj.weight": (256, 256), "output_proj.bias": (256,)}
FFN_SHAPES = {"linear1.weight": (2048, 256), "linear1.bias": (2048,), "linear2.weight": (256, 2048), "linear2.bias": (256,)}


def test_official_shapes_at_real_widths():
    sd = {k: tuple(v.shape) for k, v in CoDeformableTransformer().state_dict().items()}
    expected = dict(OFFICIAL_TRANSFORMER_SHAPES)
    for i in range(6):
        e = f"encoder.layers.{i}."
        expected.update({e + "self_attn." + k: v for k, v in MSDA_SHAPES.items()})
        expected.update({e + k: v for k, v in FFN_SHAPES.items()})
        expected.update({e + f"norm{j}.{p}": (256,) for j in (1, 2) for p in ("weight", "bias")})
        d = f"decoder.layers.{i}."
        expected.update({d + "self_attn.in_proj_weight": (768, 256), d + "self_attn.in_proj_bias": (768,),
                         d + "self_attn.out_proj.weight": (256, 256), d + "self_attn.out_proj.bias": (256,)})
        expected.update({d + "cross_attn." + k: v for k, v in MSDA_SHAPES.items()})
        expected.update({d + k: v for k, v in FFN_SHAPES.items()})
        expected.update({d + f"norm{j}.{p}": (256,) for j in (1, 2, 3) for p in ("weight", "bias")})
    assert sd == expected


# ------------------------------------------------------------------ DINO's decoder hooks

def dino_decoder(num_layers=2):
    torch.manual_seed(3)
    return DeformableDecoder(num_layers, query_pos_from_refs=True, final_norm=True, ref_eps=1e-3, embed_dims=C,
                             num_heads=M, num_levels=L, num_points=P, ffn_dims=64)


def decoder_inputs(B=2, Q=5):
    torch.manual_seed(4)
    shapes = torch.tensor(LEVELS)
    starts = torch.tensor([0, LEVELS[0][0] * LEVELS[0][1]])
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.625, 1.0], [0.75, 1.0]]])[:B]
    return torch.randn(B, Q, C), torch.rand(B, Q, 4) * 0.5 + 0.25, torch.randn(B, S, C), shapes, starts, ratios


def test_dino_hooks_equal_the_computation_written_out():
    "query_pos from the references at every layer, LayerNorm on the outputs, refinement from the un-normed output."
    from codetr.ops.box_ops import inverse_sigmoid
    from codetr.transformer.position import sine_embed_dino
    dec, regs = dino_decoder(), nn.ModuleList([mlp() for _ in range(2)])
    query, ref, memory, shapes, starts, ratios = decoder_inputs()
    hs, refs = dec(query, None, ref, memory, shapes, starts, ratios, None, regs)
    q, r = query, ref
    for l, layer in enumerate(dec.layers):
        r_in = r[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]  # (B, Q, L, 4)
        pos = dec.ref_point_head(sine_embed_dino(r_in[:, :, 0], C // 2))
        q = layer(q, pos, r_in, memory, shapes, starts, None)
        torch.testing.assert_close(hs[l], dec.norm(q))
        new = (regs[l](q) + inverse_sigmoid(r, 1e-3)).sigmoid()
        torch.testing.assert_close(refs[l], new)
        r = new.detach()
    with pytest.raises(ValueError, match="query_pos"):
        dec(query, torch.zeros_like(query), ref, memory, shapes, starts, ratios, None, regs)
    keys = {k: tuple(v.shape) for k, v in dec.state_dict().items() if not k.startswith("layers.")}
    assert keys == {"ref_point_head.0.weight": (C, 2 * C), "ref_point_head.0.bias": (C,),
                    "ref_point_head.2.weight": (C, C), "ref_point_head.2.bias": (C,),
                    "norm.weight": (C,), "norm.bias": (C,)}  # the official DINO decoder's names


def test_self_attention_mask_separates_query_groups():
    "A block-diagonal mask (two groups, as DINO's denoising groups) makes each group's outputs independent of the other."
    dec, regs = dino_decoder(), nn.ModuleList([mlp() for _ in range(2)])
    query, ref, memory, shapes, starts, ratios = decoder_inputs(Q=6)
    group = torch.arange(6) // 3
    mask = group[:, None] != group[None]  # (Q, Q) True = blocked
    full, full_refs = dec(query, None, ref, memory, shapes, starts, ratios, None, regs, mask)
    alone, alone_refs = dec(query[:, 3:], None, ref[:, 3:], memory, shapes, starts, ratios, None, regs)
    torch.testing.assert_close(full[:, :, 3:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full_refs[:, :, 3:], alone_refs, rtol=1e-5, atol=1e-5)
    unmasked, _ = dec(query, None, ref, memory, shapes, starts, ratios, None, regs)
    assert (unmasked[:, :, 3:] - alone).abs().max() > 1e-3  # without the mask the groups do see each other


# ------------------------------------------------------------------ the feed-forward block and activation checkpointing

def ffn_parts(c=8, f=16, p=0.0):
    torch.manual_seed(5)
    return nn.Linear(c, f).double(), nn.Linear(f, c).double(), nn.Dropout(p), nn.Dropout(p)


@pytest.mark.parametrize("block", [3, 2048])
@pytest.mark.parametrize("frozen", [False, True])
def test_residual_ffn_equals_the_plain_composition(monkeypatch, block, frozen):
    "Values and gradients of x + linear2(relu(linear1(x))), in token blocks of any size, with or without weight gradients."
    import codetr.ops.ffn as ffn
    monkeypatch.setattr(ffn, "_FFN_BLOCK", block)
    lin1, lin2, d1, d2 = ffn_parts()
    for p in (*lin1.parameters(), *lin2.parameters()): p.requires_grad_(not frozen)
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    x.data[0, 0] = 0.0  # a token whose hidden units sit at the ReLU's kink for a zero bias: both paths must agree there too
    leaves = [x] + ([] if frozen else [*lin1.parameters(), *lin2.parameters()])
    ours = ffn.residual_ffn(x, lin1, lin2, d1, d2)
    plain = x + lin2(torch.relu(lin1(x)))
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-14)
    g = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad(ours, leaves, g), torch.autograd.grad(plain, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(ffn.residual_ffn(x, lin1, lin2, d1, d2), plain.detach(), rtol=0, atol=1e-14)


def test_residual_ffn_with_active_dropout_is_mmcvs_ffn():
    from codetr.ops.ffn import residual_ffn
    lin1, lin2, d1, d2 = ffn_parts(p=0.5)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    torch.manual_seed(9)
    ours = residual_ffn(x, lin1, lin2, d1, d2)
    torch.manual_seed(9)
    torch.testing.assert_close(ours, x + d2(lin2(d1(torch.relu(lin1(x))))), rtol=0, atol=0)
    d1.eval(), d2.eval()
    torch.testing.assert_close(residual_ffn(x, lin1, lin2, d1, d2), x + lin2(torch.relu(lin1(x))), rtol=0, atol=1e-14)


def encoder_pass(with_cp, train=True, grad=True):
    "Memory, gradients (features, positions, encoder parameters) and forward calls per encoder layer of a small float64 transformer."
    from codetr.transformer.deformable import DeformableTransformer, TransformerConfig
    torch.manual_seed(0)
    tr = DeformableTransformer(TransformerConfig(C, M, L, P, num_encoder_layers=3, num_decoder_layers=1, ffn_dims=64,
                                                 with_cp=with_cp)).double().train(train)
    tr.init_weights()
    calls = [0] * len(tr.encoder.layers)
    for i, layer in enumerate(tr.encoder.layers):
        layer.register_forward_pre_hook(lambda m, args, i=i: calls.__setitem__(i, calls[i] + 1))
    feats, masks, pos = inputs()
    feats = [f.double().requires_grad_() for f in feats]
    pos = [p.double().requires_grad_() for p in pos]
    with torch.set_grad_enabled(grad):
        memory = tr.encode(feats, masks, pos)[0]
    if not grad: return memory, None, calls
    grads = torch.autograd.grad(memory.square().sum(), [*feats, *pos, *tr.encoder.parameters()])
    return memory.detach(), grads, calls


@pytest.mark.parametrize("with_cp", [1, 3, 5])
def test_with_cp_gives_the_same_gradients(with_cp):
    memory0, grads0, calls0 = encoder_pass(0)
    memory, grads, calls = encoder_pass(with_cp)
    torch.testing.assert_close(memory, memory0, rtol=0, atol=0)
    for a, b in zip(grads, grads0): torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert calls0 == [1, 1, 1]
    n = min(with_cp, 3)  # more than the layers checkpoints them all (a preset's value after its encoder is shrunk)
    assert calls == [2] * n + [1] * (3 - n)  # the checkpointed layers ran again in the backward


def test_with_cp_is_off_in_evaluation_and_without_gradients():
    assert encoder_pass(3, train=False)[2] == [1, 1, 1]
    assert encoder_pass(3, train=True, grad=False)[2] == [1, 1, 1]
    torch.testing.assert_close(encoder_pass(3, train=False)[0], encoder_pass(0, train=False)[0], rtol=0, atol=0)


def test_with_cp_config_checks_and_round_trips():
    from codetr.core.config import config_from_dict, config_to_dict
    from codetr.transformer.deformable import TransformerConfig
    cfg = TransformerConfig(num_levels=5, with_cp=4)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    stored = config_to_dict(TransformerConfig(num_levels=5))
    del stored["with_cp"]  # a config stored before the field existed
    assert config_from_dict(stored).with_cp == 0
    with pytest.raises(ValueError, match="with_cp"): TransformerConfig(with_cp=-1)
