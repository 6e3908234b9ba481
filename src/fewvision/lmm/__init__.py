"""Large multimodal models (LMMs) asked about images: an OpenAI-compatible HTTP client and a local transformers
backend behind one interface, with an on-disk answer cache. Used by the ``slac`` and ``tlac`` heads."""

from __future__ import annotations

from .client import Answer, ChatCompletionsClient, LMMBackend, LMMRequestError, is_refusal


def create_lmm(url: str | None = None, model: str | None = None, *, timeout: float = 120.0, concurrency: int = 4,
               retries: int = 3, cache_dir: str | None = None, use_cache: bool = True) -> LMMBackend:
    """``url`` an http(s) endpoint -> :class:`ChatCompletionsClient`; ``url`` of ``local`` (or ``local:PATH``), or
    no url -> :class:`fewvision.lmm.local.LocalVLM` for ``model`` (a folder or a hub id)."""
    if not model:
        raise ValueError("an LMM model is needed (--lmm-model NAME, e.g. llava, or a local folder with --lmm-url local)")
    if url and url.strip().lower().startswith(("http://", "https://")):
        return ChatCompletionsClient(url, model, timeout=timeout, concurrency=concurrency, retries=retries,
                                     cache_dir=cache_dir, use_cache=use_cache)
    if url and url.strip().lower() not in ("local",):
        raise ValueError(f"--lmm-url '{url}': expected an http(s) URL or 'local'")
    from .local import LocalVLM

    return LocalVLM(model, cache_dir=cache_dir, use_cache=use_cache)


__all__ = ["Answer", "ChatCompletionsClient", "LMMBackend", "LMMRequestError", "is_refusal", "create_lmm"]
