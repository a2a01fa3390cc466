"""One solution for each "your turn" cell of the lessons, in lesson order.

Try the exercise first: these are here so that a stuck reader can compare, and so that CI can prove
each check passes with a right answer (tests/test_lessons.py runs every check with these functions,
and also with the empty stub, where it must fail).
"""
import math

import numpy as np


# --- lesson 04: the RoPE atlas -------------------------------------------------------------------

def yarn_inv_freq(head_dim, theta, original_max_position_embeddings, factor, beta_fast=32.0, beta_slow=1.0):
    j = np.arange(head_dim // 2, dtype=np.float64)
    inv_freq = theta ** (-2 * j / head_dim)

    def correction_dim(turns):
        # the pair that completes `turns` turns inside O: d·ln(O / (2π r)) / (2 ln θ)
        return head_dim * math.log(original_max_position_embeddings / (2 * math.pi * turns)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    ramp = np.clip((j - low) / (high - low), 0, 1)          # γ_j: 0 = keep, 1 = divide by f
    return (1 - ramp) * inv_freq + ramp * inv_freq / factor


def su_inv_freq(head_dim, theta, short_factor, long_factor, original_max_position_embeddings, seq_len):
    factors = np.asarray(long_factor if seq_len > original_max_position_embeddings else short_factor, np.float64)
    j = np.arange(head_dim // 2, dtype=np.float64)
    return 1.0 / (factors * theta ** (2 * j / head_dim))


# --- lesson 06: ALiBi ----------------------------------------------------------------------------

def my_alibi_slopes(n_heads, alibi_bias_max=8):
    n = 2 ** math.ceil(math.log2(n_heads))
    slopes = 2.0 ** (-np.arange(1, n + 1) * alibi_bias_max / n)   # m_k = 2^(−k·a/N)
    if n != n_heads:
        slopes = np.concatenate([slopes[1::2], slopes[0::2]])[:n_heads]   # even k first, then odd k
    return slopes.astype(np.float32)


def my_full_alibi(slopes, length):
    i = np.arange(length)
    return -np.asarray(slopes)[:, None, None] * np.abs(i[:, None] - i[None, :])


# --- lesson 03: RoPE basics ----------------------------------------------------------------------

def my_rope(x, positions, inv_freq):
    angles = np.outer(positions, inv_freq)                 # [n, d/2]: p·ω_j
    angles = np.concatenate([angles, angles], axis=-1)     # pair j and j + d/2 share an angle
    half = x.shape[-1] // 2
    rotated_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(angles) + rotated_half * np.sin(angles)


def my_interleaved_to_half(w, n_heads):
    rows, hidden = w.shape
    d = rows // n_heads
    # [heads, d/2 pairs, 2 (even, odd), hidden] -> [heads, 2, d/2, hidden]: evens first, then odds
    return w.reshape(n_heads, d // 2, 2, hidden).transpose(0, 2, 1, 3).reshape(rows, hidden)


# --- lesson 02: norms ----------------------------------------------------------------------------

def my_rms_norm_hf(x, weight, eps):
    x32 = x.astype(np.float32)
    normalised = x32 * (1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    return weight * normalised.astype(x.dtype)        # round, then multiply (and round again)


def my_rms_norm_mpt(x, weight, eps):
    x32 = x.astype(np.float32)
    normalised = x32 * (1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    return (normalised * weight.astype(np.float32)).astype(x.dtype)   # multiply in float32, round once


# --- lesson 05: attention ------------------------------------------------------------------------

def my_gqa_attention(q, k, v):
    b, n_heads, s, d = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    q_grouped = q.reshape(b, n_kv, group, s, d)                        # head h = (h // G, h % G)
    scores = q_grouped @ k[:, :, None].swapaxes(-1, -2) / np.sqrt(d)   # [b, K, G, s, s]: K broadcast over G
    scores = scores + np.triu(np.full((s, s), np.finfo(q.dtype).min), k=1)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    return (weights @ v[:, :, None]).reshape(b, n_heads, s, d)


def my_causal_mask(s, t, sliding_window=None):
    position = (t - s) + np.arange(s)[:, None]       # p_i, bottom-right aligned
    key = np.arange(t)[None, :]
    visible = key <= position
    if sliding_window is not None:
        visible &= key > position - sliding_window
    return np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)


# --- lesson 07: MLPs -----------------------------------------------------------------------------

def my_fused_swiglu(x, gate_up_weight, down_weight):
    gate, up = np.split(x @ gate_up_weight.T, 2, axis=-1)   # first half: gate
    return (gate / (1 + np.exp(-gate)) * up) @ down_weight.T


def my_gelu_tanh(z):
    return z / 2 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


# --- lesson 12: FlashAttention -------------------------------------------------------------------

def my_online_attention(q_vec, keys, values, block):
    m, l, acc = -np.inf, 0.0, np.zeros(values.shape[-1])
    for start in range(0, len(keys), block):
        scores = keys[start:start + block] @ q_vec / np.sqrt(q_vec.size)
        m_new = max(m, scores.max())
        alpha = np.exp(m - m_new)                  # re-expresses what was summed against the new max
        weights = np.exp(scores - m_new)
        l = alpha * l + weights.sum()
        acc = alpha * acc + weights @ values[start:start + block]
        m = m_new
    return acc / l


def my_tile_kinds(length, tile, sliding_window=None):
    n = length // tile
    first_q = np.arange(n)[:, None] * tile        # a query tile's smallest and largest position
    last_q = first_q + tile - 1
    first_k = np.arange(n)[None, :] * tile
    last_k = first_k + tile - 1
    # some (q, k) with k <= q and, with a window, k > q − w
    any_visible = first_k <= last_q
    all_visible = last_k <= first_q
    if sliding_window is not None:
        any_visible &= last_k > first_q - sliding_window
        all_visible &= first_k > last_q - sliding_window
    return np.where(~any_visible, 0, np.where(all_visible, 2, 1))


# --- lesson 10: tiling and pixel shuffle ---------------------------------------------------------

def my_choose_grid(width, height, max_num=12, image_size=448):
    from minivl.preprocess import candidate_grids
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for columns, rows in candidate_grids(1, max_num):
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best_diff, best = diff, (columns, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * columns * rows:
            best = (columns, rows)        # an equal ratio: the larger grid, if the image has the pixels
    return best


def my_pixel_shuffle_v2(x):
    n, rows, cols, channels = x.shape
    blocks = x.reshape(n, rows // 2, 2, cols // 2, 2, channels)      # [n, r, d_r, c, d_c, C]
    return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(n, rows // 2, cols // 2, 4 * channels)


# --- lesson 11: the InternVL chat model ----------------------------------------------------------

def my_image_tokens(num_image_token, num_tiles):
    return "<img>" + "<IMG_CONTEXT>" * (num_image_token * num_tiles) + "</img>"


def my_embed_with_images(plain_embeds, ids, image_features, context_token_id):
    embeds = plain_embeds.copy()
    # boolean-mask assignment walks the selected rows in (batch, position) order: feature k -> k-th context row
    embeds[ids == context_token_id] = image_features.reshape(-1, image_features.shape[-1])
    return embeds


# --- lesson 08: a decoder, and SmolLM2 -----------------------------------------------------------

def my_greedy(model, prompt_ids, max_new_tokens):
    out = model(prompt_ids, use_cache=True)                 # prefill: every prompt position at once
    new = []
    for _ in range(max_new_tokens):
        next_id = out.logits[:, -1].argmax(-1)              # [1]
        new.append(next_id)
        out = model(next_id[:, None], past_key_values=out.past_key_values, use_cache=True)
    return np.stack(new, axis=1)


def my_tied_logits(normed_hidden, embedding_table):
    return embedding_table @ normed_hidden                   # ĥ·Eᵀ, one score per token


# --- lesson 09: InternViT and DINOv2 -------------------------------------------------------------

def my_patch_embed(pixels, weight, bias):
    n, channels, height, width = pixels.shape
    p = weight.shape[-1]
    gh, gw = height // p, width // p
    # [n, 3, gh, p, gw, p] -> [n, gh, gw, 3, p, p]: a patch's (channel, row, column), the conv weight's order
    patches = pixels.reshape(n, channels, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, -1)
    return patches @ weight.reshape(weight.shape[0], -1).T + bias


def my_cubic_weights(in_size, out_size, A=-0.75):
    src = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    t = src - np.floor(src)

    def keys(s):
        s = np.abs(s)
        near = ((A + 2) * s - (A + 3)) * s * s + 1
        far = ((A * s - 5 * A) * s + 8 * A) * s - 4 * A
        return np.where(s <= 1, near, far)

    return np.stack([keys(1 + t), keys(t), keys(1 - t), keys(2 - t)], axis=-1)


# --- lesson 13: SmolLM2 by hand ------------------------------------------------------------------

def my_attention_repeat_kv(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)   # head h reads KV head h // G
    s, d = q.shape[2], q.shape[3]
    scores = q @ k.swapaxes(-1, -2) / d ** 0.5 + np.triu(np.full((s, s), -np.inf, dtype=q.dtype), k=1)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True) @ v


def my_logit_lens(stream_row, norm_weight, embedding_table):
    normed = stream_row / np.sqrt((stream_row * stream_row).mean() + 1e-5) * norm_weight
    return embedding_table @ normed


# --- lesson 14: DINOv2 by hand -------------------------------------------------------------------

def my_layer_norm(t, weight, bias, eps):
    mu = t.mean(-1, keepdims=True)
    return (t - mu) / np.sqrt(((t - mu) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


def my_embeddings(pixels, W, bicubic_matrix):
    weight = W["embeddings.patch_embedding.weight"]
    hidden, _, p, _ = weight.shape
    gh, gw = pixels.shape[2] // p, pixels.shape[3] // p
    tokens = my_patch_embed(pixels, weight, W["embeddings.patch_embedding.bias"])   # lesson 09's answer
    table = W["embeddings.position_embedding"]
    native = int(round((table.shape[1] - 1) ** 0.5))      # the trained grid: 1 + native² rows
    grid_table = table[0, 1:].reshape(native, native, hidden).astype(np.float64)
    resized = np.einsum("ia,jb,abc->ijc", bicubic_matrix(native, gh), bicubic_matrix(native, gw),
                        grid_table).reshape(1, gh * gw, hidden)
    x = np.concatenate([W["embeddings.class_embedding"], tokens], axis=1)     # CLS first
    return x + np.concatenate([table[:, :1], resized.astype(np.float32)], axis=1)
