"""The DICE refiner ("sharpener" in the paper): a ~2M-parameter network that rewrites prompt token
embeddings so that ONE model pass at cfg 1 reproduces the classifier-free-guided output.

Layer layout and parameter names follow the published module, so an official state dict loads
unchanged:  fc1 -> ReLU (shared by both inputs) -> cross-attention(query=prompt, context=null)
-> ReLU -> fc2.
"""
from __future__ import annotations

import torch
from torch import nn

DEFAULT_INNER_DIM = 512
DEFAULT_HEADS = 8

# The parameter names of the official module, in state-dict order.
PARAMETER_NAMES = (
    "fc1.weight", "fc1.bias",
    "attention.to_q.weight", "attention.to_k.weight", "attention.to_v.weight",
    "attention.to_out.0.weight", "attention.to_out.0.bias",
    "fc2.weight", "fc2.bias",
)


class RefinerAttention(nn.Module):
    """Multi-head cross-attention without biases on q/k/v (to_out has one)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"inner dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y):  # [B, N, d] -> [B, h, N, d/h]
            return y.reshape(y.shape[0], y.shape[1], h, d // h).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        scores = (q @ k.transpose(-1, -2)) * (d // h) ** -0.5
        out = scores.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, t, d))


class DiceRefiner(nn.Module):
    """S(c, uc): the correction added to the prompt tokens c, given the null / negative tokens uc.

    c: [B, T, D], uc: [B or 1, T', D]; T and T' may differ. Returns [B, T, D].
    """

    def __init__(self, token_dim: int, inner_dim: int = DEFAULT_INNER_DIM, heads: int = DEFAULT_HEADS):
        super().__init__()
        self.token_dim, self.inner_dim, self.heads = token_dim, inner_dim, heads
        self.fc1 = nn.Linear(token_dim, inner_dim)
        self.attention = RefinerAttention(inner_dim, heads)
        self.fc2 = nn.Linear(inner_dim, token_dim)

    def forward(self, c: torch.Tensor, uc: torch.Tensor) -> torch.Tensor:
        if uc.shape[0] != c.shape[0]:
            uc = uc.expand(c.shape[0], -1, -1)
        h_c, h_uc = torch.relu(self.fc1(c)), torch.relu(self.fc1(uc))
        return self.fc2(torch.relu(self.attention(h_c, h_uc)))

    @torch.no_grad()
    def zero_output_(self) -> "DiceRefiner":
        """Zero the last layer: S = 0, the refiner starts as the identity (used by the trainer)."""
        self.fc2.weight.zero_()
        self.fc2.bias.zero_()
        return self


# CLIP text encoders (SD1.x / SD2.x / SDXL; ComfyUI and both webuis) encode a prompt longer than 75
# tokens as 77-token chunks, each with its own start-of-text token, concatenated.
CHUNK_TOKENS = 77


def start_token_positions(num_tokens: int) -> list[int]:
    """Positions of the start-of-text tokens in a [.., num_tokens, ..] CLIP encoding.

    A multiple of 77 tokens is read as 77-token chunks (0, 77, 154, ...); any other length has one
    start token, at 0."""
    if num_tokens >= CHUNK_TOKENS and num_tokens % CHUNK_TOKENS == 0:
        return list(range(0, num_tokens, CHUNK_TOKENS))
    return [0]


def w_input_tokens(c: torch.Tensor, uc: torch.Tensor, amount) -> torch.Tensor:
    """The query input of a w-conditioned refiner: c + amount * (c - uc), TeEFusion's fusion scaled
    down, with amount = scale * (w - w_ref) per file (a float, or one value per batch row). At
    w = w_ref it is c itself, so a single-w refiner is the special case amount = 0. uc is tiled or
    cut to c's length (one start token per 77-token chunk on both sides)."""
    if uc.shape[1] != c.shape[1]:
        reps = -(-c.shape[1] // uc.shape[1])
        uc = uc.repeat(1, reps, 1)[:, :c.shape[1]]
    if isinstance(amount, torch.Tensor):
        amount = amount.to(c.device, c.dtype).reshape(-1, 1, 1)
    return c + amount * (c - uc)


def refine(refiner: DiceRefiner, c: torch.Tensor, uc: torch.Tensor, alpha: float = 1.0,
           keep_first_token: bool = True, w_amount=None) -> torch.Tensor:
    """c_refined = c + alpha * S(c, uc), with the start-of-text tokens kept when the family has them.

    Long prompts: refiners are trained on 77-token prompts whose start token is kept, so with
    keep_first_token every 77-token chunk keeps its own start token (positions 0, 77, 154, ... when
    the length is a multiple of 77; see `start_token_positions`), except where a row repeats the
    token before it there (A1111's padding of a shorter prompt in a batch). The prompt is refined in one call
    against the whole uc: S's attention takes its queries from c and its keys / values from uc only,
    so each token's correction depends on that token and uc alone, and refining the chunks one by one
    would give the same numbers. For 77 tokens this is the official rule (token 0 kept).

    w_amount: for refiners trained for a range of w, the refiner reads `w_input_tokens(c, uc,
    w_amount)` in place of c (the correction is still added to c); None for single-w refiners.

    Runs the refiner in its own parameter dtype on c's device and returns c's dtype, so fp16 / bf16
    conditioning is refined with fp32 maths. Differentiable (the trainer uses it too).
    """
    if c.ndim != 3 or uc.ndim != 3:
        raise ValueError(f"expected [batch, tokens, dim] tensors, got {tuple(c.shape)} and {tuple(uc.shape)}")
    if uc.shape[0] not in (1, c.shape[0]):
        raise ValueError(f"negative batch {uc.shape[0]} does not match prompt batch {c.shape[0]} (nor is 1)")
    param = next(refiner.parameters())
    work = param.dtype
    query = c.to(param.device, work)
    if w_amount is not None:
        query = w_input_tokens(query, uc.to(param.device, work), w_amount)
    delta = refiner(query, uc.to(param.device, work)).to(c.device)
    out = c.to(work) + alpha * delta
    if keep_first_token:
        positions = start_token_positions(c.shape[1])
        if positions == [0]:
            out = torch.cat([c[:, :1].to(work), out[:, 1:]], dim=1)
        else:
            keep = torch.zeros(c.shape[0], c.shape[1], 1, dtype=torch.bool, device=c.device)
            keep[:, 0] = True
            for p in positions[1:]:
                # A1111 pads the shorter rows of a batch by repeating their last token vector: such a
                # position is padding, not a chunk start (a real start token differs from the token before it)
                keep[:, p, 0] = (c[:, p] != c[:, p - 1]).any(dim=-1)
            out = torch.where(keep, c.to(work), out)
    return out.to(c.dtype)
