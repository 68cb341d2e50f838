"""The projector and the RSLLM wrapper: an LLM (+ LoRA) whose `[ITEM]` placeholder embeddings are replaced
by projector(SASRec item embedding) before the decoder runs (inputs_embeds).

Shapes: B batch, T tokens, H LLM hidden size, D SASRec dimension, V vocabulary, N_items + 1 table rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from components.errors import ModelError

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class Projector(nn.Module):
    """Small MLP: SASRec item embedding [.., D] -> LLM input-embedding space [.., H]."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 256):
        super().__init__()
        self.d_in, self.d_out, self.hidden = d_in, d_out, hidden
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [.., D] -> [.., H]
        return self.net(x)

    def config(self) -> dict:
        return {"d_in": self.d_in, "d_out": self.d_out, "hidden": self.hidden}


@torch.no_grad()
def calibrate_projector(
    projector: Projector, item_table: torch.Tensor, token_embeddings: torch.Tensor, spread: float = 0.1
) -> float:
    """Start a fresh projector near the LLM's mean token embedding, with item-specific deviations of
    `spread` x the spread of the token embeddings (in RMS).

    Random-direction vectors at placeholders derail a pretrained LLM (on SmolLM2-135M the LM loss of unified
    prompts rose from 2.1 to 4.2 with them); centred on the mean embedding they do not, and the projector
    learns the deviations.  item_table [N + 1, D] (row 0 = padding), token_embeddings [V, H].
    Returns the scale applied to the last layer's weight.
    """
    last = projector.net[-1]
    last.bias.zero_()
    out = projector(item_table[1:].float())  # [N, H], bias-free
    tokens = token_embeddings.float()
    rms = lambda x: x.pow(2).mean().sqrt()  # noqa: E731
    scale = float(spread * rms(tokens - tokens.mean(0)) / rms(out - out.mean(0)).clamp_min(1e-12))
    last.weight.mul_(scale)
    last.bias.copy_(tokens.mean(0) - scale * out.mean(0))  # mean output = mean token embedding
    return scale


class ScoreHead(nn.Module):
    """The ranker's two small projection heads: score(user, c) = <W_u h_user, W_i h_c> / sqrt(dim).

    h_user = the hidden state at the prompt's last position, h_c = the hidden state at candidate c's `[ITEM]`
    marker, both read after decoder layer `layer` (-1: the last layer, after the final norm; k >= 1: the
    output of layer k, where the injected ID vectors are still nearly intact: llm.head_layer).
    Trained with a softmax over each prompt's candidates (L_user_item); ranking reads the same scores.
    `id` and `text` project an item's ID embedding and its title's hidden state for L_id_text.

    With an ID skip (`id_skip` = D > 0, llm.head_id_skip) the item side also reads the candidate's SASRec
    item embedding e_c [D] directly: W_i h_c + W_s e_c, so a rare item's identity does not have to survive
    the decoder. W_s starts at zero (the head scores as without it), and a candidate without an ID (cold)
    gets e_c = 0: its score is its title's, on the same scale. The user side is the LLM's alone.
    """

    def __init__(self, hidden: int, dim: int = 256, layer: int = -1, id_skip: int = 0):
        super().__init__()
        if layer == 0 or layer < -1:
            raise ModelError(f"score head layer {layer}: -1 (the last) or a decoder layer k >= 1")
        self.hidden, self.dim, self.layer = hidden, dim, layer
        self.user = nn.Linear(hidden, dim)
        self.item = nn.Linear(hidden, dim)
        self.id = nn.Linear(hidden, dim)
        self.text = nn.Linear(hidden, dim)
        self.skip: nn.Linear | None = None
        if id_skip:
            self.add_id_skip(id_skip)

    @property
    def id_skip(self) -> int:
        """Size D of the item embedding the ID skip reads; 0: no skip."""
        return self.skip.in_features if self.skip is not None else 0

    def add_id_skip(self, d: int) -> None:
        """A zero-initialised W_s [dim, d] from the SASRec item embedding to the item side."""
        if d < 1:
            raise ModelError(f"score head ID skip: the item embedding size must be >= 1, got {d}")
        self.skip = nn.Linear(d, self.dim, bias=False).to(self.item.weight.device)
        nn.init.zeros_(self.skip.weight)

    def forward(
        self, h_user: torch.Tensor, h_cand: torch.Tensor, e_cand: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h_user [B, H], h_cand [B, C, H] (, e_cand [B, C, D] with an ID skip) -> scores [B, C] (float32)."""
        u = self.user(h_user.to(self.user.weight.dtype))  # [B, d]
        c = self.item(h_cand.to(self.item.weight.dtype))  # [B, C, d]
        if self.skip is not None:
            if e_cand is None:
                raise ModelError("this score head has an ID skip: pass the candidates' item embeddings")
            c = c + self.skip(e_cand.to(self.skip.weight.dtype))  # [B, C, d]
        return torch.einsum("bd,bcd->bc", u, c).float() / self.dim**0.5

    def config(self) -> dict:
        return {"hidden": self.hidden, "dim": self.dim, "layer": self.layer, "id_skip": self.id_skip}


def save_head(head: ScoreHead, path: Path) -> None:
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()},
        str(path),
        metadata={k: str(v) for k, v in head.config().items()},
    )


def load_head(path: Path) -> ScoreHead:
    """Inverse of save_head."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: score head weights not found")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    try:
        head = ScoreHead(
            int(meta["hidden"]), int(meta["dim"]), int(meta.get("layer", -1)), int(meta.get("id_skip", 0))
        )
    except KeyError as e:
        raise ModelError(f"{path}: metadata lacks {e} (not a score head file)") from None
    head.load_state_dict(load_file(str(path)))
    return head


def save_projector(projector: Projector, path: Path) -> None:
    """Projector weights as safetensors; its sizes ride along in the file's metadata."""
    meta = {k: str(v) for k, v in projector.config().items()}
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()},
        str(path),
        metadata=meta,
    )


def load_projector(path: Path) -> Projector:
    """Inverse of save_projector."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: projector weights not found")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    try:
        proj = Projector(int(meta["d_in"]), int(meta["d_out"]), int(meta["hidden"]))
    except KeyError as e:
        raise ModelError(f"{path}: metadata lacks {e} (not a projector file)") from None
    proj.load_state_dict(load_file(str(path)))
    return proj


def load_item_table(source: torch.Tensor | Path) -> torch.Tensor:
    """SASRec item embeddings [N_items + 1, D] (row 0 = padding) from a tensor, a safetensors file holding
    one tensor (or `item_embeddings`), or a SASRec model folder (components.recommender)."""
    if isinstance(source, torch.Tensor):
        return source.detach().float()
    source = Path(source)
    if source.is_dir():
        from components.recommender import load_item_embeddings

        return load_item_embeddings(source).detach().float()
    if not source.exists():
        raise ModelError(f"{source}: item embeddings not found")
    tensors = load_file(str(source))
    if "item_embeddings" in tensors:
        return tensors["item_embeddings"].float()
    if len(tensors) != 1:
        raise ModelError(f"{source}: expected one tensor or `item_embeddings`, found {sorted(tensors)}")
    return next(iter(tensors.values())).float()


def add_lora(model, r: int, alpha: int, dropout: float, targets: list[str] | str):
    """Wrap a causal LM with fresh LoRA adapters (peft); only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, cfg)


def load_lora(model, adapter_dir: Path, trainable: bool):
    """Attach saved LoRA adapters (e.g. stage 1's) to a base causal LM."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"{adapter_dir}: no LoRA adapter (adapter_config.json missing)")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


class RsllmModel(nn.Module):
    """LLM (+ LoRA) + projector + frozen SASRec item table.

    `item_at` tensors ([B, T] int64) carry, at each `[ITEM]` position, the item_idx whose projected ID
    embedding replaces the placeholder's input embedding; 0 elsewhere. Text-only mode (projector None)
    never injects anything.
    """

    def __init__(
        self,
        llm,
        projector: Projector | None = None,
        item_table: torch.Tensor | None = None,
        head: ScoreHead | None = None,
        user_projector: Projector | None = None,
    ):
        super().__init__()
        self.llm = llm
        self.projector = projector
        self.head = head
        self.user_projector = user_projector  # SASRec user vector -> the `[USER]` placeholder
        if projector is not None and item_table is None:
            raise ModelError("a unified model needs the SASRec item table")
        self.register_buffer(
            "item_table", item_table if item_table is not None else torch.zeros(1, 1), persistent=False
        )

    @property
    def unified(self) -> bool:
        return self.projector is not None

    @property
    def causal_lm(self):
        """The underlying transformers causal LM (LoRA layers, if any, are injected in place)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def project(self, items: torch.Tensor) -> torch.Tensor:  # [N] item_idx -> [N, H]
        return self.projector(self.item_table[items])

    def embed(
        self,
        input_ids: torch.Tensor,
        item_at: torch.Tensor | None = None,
        user_pos: torch.Tensor | None = None,
        user_vec: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, H] with placeholders replaced by projected ID embeddings, and (with a
        user projector) position user_pos[b] (-1: none) by user_projector(user_vec[b]) ([B, D])."""
        emb = self.causal_lm.get_input_embeddings()(input_ids)  # [B, T, H]
        if self.unified and item_at is not None and bool((item_at > 0).any()):
            mask = item_at > 0  # [B, T]
            emb = emb.clone()
            emb[mask] = self.project(item_at[mask]).to(emb.dtype)  # [n_placeholders, H]
        if self.user_projector is not None and user_pos is not None and bool((user_pos >= 0).any()):
            rows = torch.nonzero(user_pos >= 0).squeeze(-1)  # [B']
            emb = emb.clone()
            vec = user_vec[rows].to(self.user_projector.net[0].weight.dtype)  # [B', D]
            emb[rows, user_pos[rows]] = self.user_projector(vec).to(emb.dtype)
        return emb

    def hidden(
        self,
        input_ids: torch.Tensor,
        item_at: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        user_pos: torch.Tensor | None = None,
        user_vec: torch.Tensor | None = None,
        layer: int = -1,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Last-layer hidden states [B, T, H]; attention_mask may be [B, T] or a 4D [B, 1, T, T] mask.

        layer = k >= 1: also the output of decoder layer k, as (last [B, T, H], layer k [B, T, H]), from the
        same forward (the score head's input with llm.head_layer)."""
        decoder = self.causal_lm.get_decoder()
        out = decoder(
            inputs_embeds=self.embed(input_ids, item_at, user_pos, user_vec),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=layer != -1,
        )
        if layer == -1:
            return out.last_hidden_state
        if layer >= len(out.hidden_states) - 1:
            raise ModelError(f"head layer {layer}: the LLM has {len(out.hidden_states) - 1} decoder layers")
        return out.last_hidden_state, out.hidden_states[layer]

    def head_states(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(last-layer states, the score head's input states), both [B, T, H], from one forward."""
        layer = self.head.layer if self.head is not None else -1
        out = self.hidden(*args, **kwargs, layer=layer)
        return (out, out) if layer == -1 else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [.., H] -> [.., V]
        """LM head on selected hidden states only (logits are computed where needed)."""
        return self.causal_lm.get_output_embeddings()(hidden)

    def head_scores(
        self,
        h: torch.Tensor,
        prompt_end: torch.Tensor,
        cand_pos: torch.Tensor,
        item_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Head scores [B, C] from hidden states h [B, T, H]: the prompt's last position vs each marker.
        item_at [B, T] (the item injected at each position) feeds a head's ID skip: the SASRec embedding of
        the item at each marker, zeros where none is (a cold candidate)."""
        rows = torch.arange(len(h), device=h.device)
        e_cand = None
        if self.head.skip is not None:
            if not self.unified or item_at is None:
                raise ModelError("a head with an ID skip needs a unified model and the prompts' item_at")
            items = item_at[rows[:, None], cand_pos]  # [B, C], 0 = no ID
            e_cand = self.item_table[items] * (items > 0).unsqueeze(-1)  # [B, C, D]
        return self.head(h[rows, prompt_end], h[rows[:, None], cand_pos], e_cand)

    def forward(self, batch: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, torch.Tensor]:
        """Training losses for one batch (see components.llm.losses); `forward` so that DDP syncs grads."""
        from components.llm.losses import batch_losses

        return batch_losses(self, batch, **weights)


def export_projected(stage_dir: Path, out_path: Path, tolerance: float = 1e-4) -> dict:
    """projector(SASRec embedding) for every item of a stage-2 folder -> safetensors `projected_items`
    [N_items + 1, H] (row 0 = padding, zeros), so a service builds unified prompts without the projector.
    The written file is read back and checked against the torch projector (max abs diff <= tolerance)."""
    from safetensors.torch import save as st_save

    from components.io import atomic_file

    stage_dir = Path(stage_dir)
    projector = load_projector(stage_dir / "projector.safetensors").eval()
    table = load_item_table(stage_dir / "item_embeddings.safetensors")  # [N + 1, D]
    with torch.no_grad():
        projected = projector(table)  # [N + 1, H]
        projected[0] = 0.0
    with atomic_file(Path(out_path)) as fh:
        fh.write(st_save({"projected_items": projected.contiguous()}))
    again = load_file(str(out_path))["projected_items"]
    with torch.no_grad():
        diff = float((again[1:] - projector(table[1:])).abs().max()) if len(table) > 1 else 0.0
    if diff > tolerance:
        raise ModelError(f"{out_path}: projected items differ from the projector by {diff:.2e} > {tolerance}")
    return {"path": str(out_path), "items": len(table) - 1, "dim": projected.shape[1], "max_abs_diff": diff}
