"""A new token in a loaded SD 1.x/2.x or SDXL pipeline whose input embedding is a trainable vector (one per text tower).

The pipeline is changed in place (its tokenizer gains the token), as loading an embedding does.

Textual inversion (Gal et al. 2022, Sec. 3): the token is added to the tokenizer and the text
encoder's embedding table; a forward hook on that table swaps the token's row for the vector
being learned, so gradients reach the vector alone and every other word stays exactly as it was.
"""

from __future__ import annotations

import torch

from conceptkit.errors import UsageError


def towers(model) -> list[tuple]:
    """(tokenizer, text encoder) of each text tower: one for SD 1.x/2.x, two for SDXL (CLIP-L, then OpenCLIP-G)."""
    pipe = model.pipe
    out = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return out


def check_new_token(model, token: str) -> None:
    """The token must be one word no tokenizer of the model knows yet."""
    if not token or token != token.strip() or any(ch.isspace() for ch in token):
        raise UsageError(f"--token {token!r} must be one word without spaces, e.g. '<my-thing>'")
    for tok, _ in towers(model):
        if token in tok.get_vocab() or len(tok(token, add_special_tokens=False).input_ids) == 1:
            raise UsageError(f"--token {token!r} is already a word of {model.spec}'s tokenizer; pick a new one, e.g. '<{token.strip('<>')}-ti>'")


SUPPORTED_ARCHS = ("sd1", "sd2", "sdxl")  # CLIP text towers with an input embedding table and a UNet with cross-attention


def check_supported(model, method: str) -> None:
    if model.arch not in SUPPORTED_ARCHS:
        raise UsageError(f"--method {method}: implant supports SD 1.x/2.x and SDXL models; {model.spec} is {model.arch}")


def init_vectors(model, init_word: str) -> list[torch.Tensor]:
    """Per text tower, the mean input embedding of the init word's tokens: where the new word starts (d,)."""
    if not init_word.strip():
        raise UsageError("--init-word is empty: give a word close to the concept, e.g. --init-word dog")
    out = []
    for tok, encoder in towers(model):
        ids = tok(init_word, add_special_tokens=False).input_ids
        if not ids:
            raise UsageError(f"--init-word {init_word!r} gives no tokens")
        table = encoder.get_input_embeddings().weight
        out.append(table[torch.tensor(ids, device=table.device)].detach().float().mean(0).cpu())
    return out


def init_vector(model, init_word: str) -> torch.Tensor:
    """The first tower's starting vector (d,)."""
    return init_vectors(model, init_word)[0]


class LearnedToken:
    """`token` in the pipeline's tokenizer, its embedding row replaced by a learned vector while installed.

    `vector` is (d,), or (D, d) for one vector per timestep group or layer (`implant --method
    temporal` / `xti`): set `rows` to each caption's group before encoding a batch; row D stands for
    the mean of the D vectors (what the table holds once finished: SDXL's pooled embedding under xti).
    """

    def __init__(self, model, token: str, vector: torch.Tensor, tower: int = 0):
        self.tokenizer, self.encoder = towers(model)[tower]
        self.token = token
        self.tokenizer.add_tokens([token])
        self.id = self.tokenizer.convert_tokens_to_ids(token)
        self.encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        table = self.encoder.get_input_embeddings()
        self.vector = torch.nn.Parameter(vector.detach().to(table.weight.device, torch.float32).clone())
        self.rows: torch.Tensor | None = None  # (b,) group of each caption, for (D, d) vectors
        self._hook = table.register_forward_hook(self._swap)

    def _swap(self, _module, inputs, output):
        ids = inputs[0]
        where = (ids == self.id).unsqueeze(-1)
        if self.vector.ndim == 1:
            vec = self.vector
        else:
            rows = torch.cat([self.vector, self.vector.mean(0, keepdim=True)])  # row D: the mean
            vec = rows[self.rows.to(self.vector.device)][:, None, :]
        return torch.where(where, vec.to(output.dtype), output)

    def finish(self) -> torch.Tensor:
        """Write the learned vector into the embedding table and take the hook off: the pipeline now
        knows the token as `models.textual_inversion.add_embedding` would have taught it. Returns it."""
        self._hook.remove()
        table = self.encoder.get_input_embeddings().weight
        vec = self.vector.detach()
        with torch.no_grad():
            table[self.id] = (vec if vec.ndim == 1 else vec.float().mean(0)).to(table.dtype)
        return vec.float().cpu()
