"""Packed sequences laid out from chunk boundaries: the token <-> slot maps the chunked backends share.

Sequence n fills ceil(len_n / C) whole chunks starting at chunk first_chunk[n]; slot i of chunk c holds
the token at position chunk_pos0[c] + i of sequence chunk_seq[c] (counted from its last token with
reverse=True, so a forward recurrence over slots is the reverse recurrence), when i < chunk_len[c].
Which chunk belongs to which sequence (and what the chunks after the last sequence do) is each
backend's own choice; given that, the maps are the same.
"""

import jax.numpy as jnp


def slot_maps(cu_seqlens, T, C, first_chunk, chunk_seq, chunk_pos0, chunk_len, reverse):
    """(token_of_slot [S], slot_valid [S], slot_of_token [T]) with S = len(chunk_seq) * C slots.

    token_of_slot is 0 where the slot is padding (slot_valid False)."""
    slot = jnp.arange(chunk_seq.shape[0] * C, dtype=jnp.int32)
    slot_chunk, slot_pos = slot // C, slot % C
    pos = chunk_pos0[slot_chunk] + slot_pos
    slot_valid = slot_pos < chunk_len[slot_chunk]
    n = chunk_seq[slot_chunk]
    token = jnp.where(reverse, cu_seqlens[n + 1] - 1 - pos, cu_seqlens[n] + pos)
    token_of_slot = jnp.where(slot_valid, token, 0)

    t = jnp.arange(T, dtype=jnp.int32)
    t_seq = (jnp.searchsorted(cu_seqlens, t, side="right") - 1).astype(jnp.int32)
    t_pos = jnp.where(reverse, cu_seqlens[t_seq + 1] - 1 - t, t - cu_seqlens[t_seq])
    slot_of_token = first_chunk[t_seq] * C + t_pos
    return token_of_slot, slot_valid, slot_of_token
