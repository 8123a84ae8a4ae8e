"""Feature dashboards: one self-contained HTML page showing, for each chosen SAE latent, how often it fires,
the texts where it fires most (each token shaded by the latent's activation), and which tokens its
decoder direction promotes and suppresses when read straight through the unembedding (``W_U · d``, the
final norm skipped: the direct logit effect, as in Bricken et al. 2023's dashboards)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch

from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_text
from safetylab.interp.data import pad_right
from safetylab.interp.hooks import Hooks
from safetylab.interp.sae import SparseAutoencoder
from safetylab.interp.store import real_token_activations


@dataclass(frozen=True)
class Context:
    """One text where a latent fired: its tokens, the latent's activation on each, and the peak's position."""

    tokens: list[str]
    acts: list[float]
    peak: int
    max_act: float


@dataclass(frozen=True)
class FeatureCard:
    feature: int
    density: float
    contexts: list[Context]
    top_logits: list[tuple[str, float]]
    bottom_logits: list[tuple[str, float]]


@torch.no_grad()
def feature_codes(sae: SparseAutoencoder, hooks: Hooks, name: str, rows: Sequence[Sequence[int]], pad_id: int,
                  features: Sequence[int], batch_size: int = 64) -> list[torch.Tensor]:
    """The chosen latents' activations on each row's tokens: one ``(len(row), len(features))`` tensor a row."""
    index = torch.as_tensor(list(features), dtype=torch.long)
    out: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        acts = real_token_activations(hooks, name, pad_right(chunk, pad_id))
        codes = sae.encode(acts.to(sae.W_enc.device))[:, index.to(sae.W_enc.device)].cpu()
        out.extend(codes.split([len(r) for r in chunk]))
    return out


@torch.no_grad()
def logit_effects(sae: SparseAutoencoder, hooks: Hooks, features: Sequence[int]) -> torch.Tensor | None:
    """``W_U · d_i`` for each chosen latent's decoder direction ``d_i`` (in raw activation units): ``(features,
    vocab)``; None when the SAE's width is not the unembedding's (a hook point off the residual stream)."""
    unembed = hooks.model.get_output_embeddings().weight  # (vocab, d_model)
    if unembed.shape[-1] != sae.config.d_in:
        return None
    directions = sae.W_dec[list(features)] / sae.input_scale
    return directions.to(unembed) @ unembed.t()


def feature_cards(sae: SparseAutoencoder, hooks: Hooks, name: str, tokenizer, texts: Sequence[str],
                  features: Sequence[int], top: int = 8, n_logits: int = 10) -> list[FeatureCard]:
    """The dashboard's content for ``features``, measured on ``texts`` (each tokenized as it stands)."""
    if not texts:
        raise SafetylabError("feature_dashboard: no texts; expected the texts to find top activations in")
    bad = [f for f in features if not 0 <= f < sae.config.width]
    if bad:
        raise SafetylabError(f"feature_dashboard: feature {bad[0]} is not a latent of this SAE (expected 0.."
                             f"{sae.config.width - 1})")
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for t in texts]
    codes = feature_codes(sae, hooks, name, rows, tokenizer.pad_token_id, features)
    n_tokens = sum(len(r) for r in rows)
    effects = logit_effects(sae, hooks, features)
    cards = []
    for j, feature in enumerate(features):
        peaks = torch.stack([c[:, j].max() for c in codes])
        fired = sum(int((c[:, j] > 0).sum()) for c in codes)
        order = [i for i in peaks.argsort(descending=True).tolist()[:top] if peaks[i] > 0]
        contexts = [Context(tokens=tokenizer.convert_ids_to_tokens(rows[i]), acts=codes[i][:, j].tolist(),
                            peak=int(codes[i][:, j].argmax()), max_act=float(peaks[i])) for i in order]
        top_logits = bottom_logits = []
        if effects is not None:
            values, ids = effects[j].topk(n_logits)
            top_logits = list(zip(tokenizer.convert_ids_to_tokens(ids.tolist()), values.tolist()))
            values, ids = (-effects[j]).topk(n_logits)
            bottom_logits = list(zip(tokenizer.convert_ids_to_tokens(ids.tolist()), (-values).tolist()))
        cards.append(FeatureCard(feature, fired / n_tokens, contexts, top_logits, bottom_logits))
    return cards


def feature_dashboard(sae: SparseAutoencoder, hooks: Hooks, name: str, tokenizer, texts: Sequence[str],
                      features: Sequence[int], path: str | os.PathLike, top: int = 8,
                      title: str | None = None) -> Path:
    """Write the dashboard of ``features`` (measured on ``texts``) to ``path``, one HTML page with its
    styles inline; every text is escaped. Returns ``path``."""
    cards = feature_cards(sae, hooks, name, tokenizer, texts, features, top)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(TEMPLATE).render(cards=cards, hook=name, n_texts=len(texts), d_sae=sae.config.width,
                                            kind=sae.config.kind, title=title or f"SAE features at {name}",
                                            shade=_shade)
    path = Path(path)
    atomic_write_text(path, html)
    return path


def _shade(act: float, max_act: float) -> str:
    """A CSS background for a token: transparent at 0, full orange at the context's peak."""
    alpha = 0.0 if max_act <= 0 else max(0.0, min(1.0, act / max_act))
    return f"background: rgba(255, 140, 0, {alpha:.2f})"


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 1em; margin-bottom: 1.5em; }
.ctx { font-family: monospace; margin: 0.3em 0; line-height: 1.8; }
.tok { padding: 1px 2px; border-radius: 2px; }
.peak { outline: 1px solid #a50; }
.logits { display: flex; gap: 3em; }
table { border-collapse: collapse; } td { padding: 0 0.6em; font-family: monospace; }
.muted { color: #777; }
</style></head><body>
<h1>{{ title }}</h1>
<p class="muted">{{ kind }} SAE with {{ d_sae }} latents at <code>{{ hook }}</code>; activations measured on
{{ n_texts }} texts. Tokens are shaded by the latent's activation relative to that text's peak.</p>
{% for card in cards %}
<div class="card" id="feature-{{ card.feature }}">
<h2>Feature {{ card.feature }}</h2>
<p>Density: fires on {{ "%.3f"|format(card.density * 100) }}% of tokens.</p>
<h3>Top activating texts</h3>
{% if not card.contexts %}<p class="muted">Never fires on these texts.</p>{% endif %}
{% for ctx in card.contexts %}
<div class="ctx"><span class="muted">{{ "%.2f"|format(ctx.max_act) }}</span>
{% for tok in ctx.tokens %}<span class="tok{% if loop.index0 == ctx.peak %} peak{% endif %}"
 style="{{ shade(ctx.acts[loop.index0], ctx.max_act) }}"
 title="{{ '%.3f'|format(ctx.acts[loop.index0]) }}">{{ tok }}</span> {% endfor %}
</div>
{% endfor %}
<h3>Logit effects (W_U · decoder direction)</h3>
{% if card.top_logits %}
<div class="logits">
<table><tr><th>promotes</th><th></th></tr>
{% for tok, v in card.top_logits %}<tr><td>{{ tok }}</td><td>{{ "%+.3f"|format(v) }}</td></tr>{% endfor %}</table>
<table><tr><th>suppresses</th><th></th></tr>
{% for tok, v in card.bottom_logits %}<tr><td>{{ tok }}</td><td>{{ "%+.3f"|format(v) }}</td></tr>{% endfor %}</table>
</div>
{% else %}<p class="muted">Not shown: this hook point's width is not the unembedding's.</p>{% endif %}
</div>
{% endfor %}
</body></html>
"""
