"""A small vision-language model run in-process through transformers (``AutoModelForImageTextToText``): a chat
model with its chat template, or BLIP-2 (``Blip2ForConditionalGeneration``, e.g. ``Salesforce/blip2-opt-2.7b``) with
its paper's question-answer prompt.

Same interface as the HTTP client (:class:`fewvision.lmm.client.LMMBackend`): ``ask(path, prompt) -> Answer``,
answers cached by (image sha256, model, prompt). The model comes from a local folder or a hub id; hub ids are looked
up in the cache first and fail fast with a clear message when offline (:func:`fewvision.backbones.weights.hub_snapshot`).
Generation is greedy (the equivalent of temperature 0). One generation at a time: a CPU or a single GPU gains
nothing from parallel requests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..backbones.base import BackboneError
from ..backbones.weights import file_digest, hub_snapshot
from ..io.images import load_image
from ..io.paths import weights_dir
from .client import LMMBackend, LMMRequestError


class LocalVLM(LMMBackend):
    concurrency = 1

    def __init__(self, model: str, *, cache_dir: str | None = None, use_cache: bool = True, download: bool = True,
                 device: str = "cpu", max_new_tokens: int = 64):
        super().__init__(cache_dir, use_cache)
        from transformers import (  # heavy import, only when this backbone is used
            AutoModelForImageTextToText,
            AutoProcessor,
        )
        target = model.removeprefix("local:").strip()
        local = Path(target).expanduser()
        folder = local if local.exists() else hub_snapshot(f"local:{target}", target, cache=weights_dir(cache_dir),
                                                           download=download)
        try:
            self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            first = " ".join(str(err).split())[:200]
            raise BackboneError(f"{folder}: cannot load an image-text-to-text model from here ({first})") from None
        self.model.eval().to(device)
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.name = target
        # The weights' digest keys the answer cache, so replaced weights never reuse old answers.
        self.model_id = f"local:{file_digest(folder)[:16]}"

    def describe(self) -> str:
        return f"local {self.name}"

    def _inputs(self, image, prompt: str):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None):
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        elif getattr(self.model.config, "model_type", None) == "blip-2":
            # BLIP-2 (Blip2ForConditionalGeneration): the processor puts the query tokens in front itself; the
            # paper's zero-shot VQA prompts, "Short answer" for its FlanT5 models
            t5 = getattr(self.model.config.text_config, "model_type", "") == "t5"
            text = f"Question: {prompt} {'Short answer' if t5 else 'Answer'}:"
        else:
            token = getattr(self.processor, "image_token", None) or "<image>"
            text = f"{token}\n{prompt}"
        return self.processor(images=[image], text=[text], return_tensors="pt")

    def _generate(self, path: str, prompt: str) -> str:
        image = load_image(path)
        self.requests += 1
        try:
            inputs = self._inputs(image, prompt).to(self.device)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        except (RuntimeError, ValueError, IndexError) as err:  # IndexError: a prompt past the position table
            raise LMMRequestError(f"local generation failed ({' '.join(str(err).split())[:160]})") from None
        # a decoder-only language model returns the prompt and the answer; an encoder-decoder one (BLIP-2's
        # FlanT5) the answer alone
        language = getattr(self.model.config, "text_config", self.model.config)
        new_tokens = out if getattr(language, "is_encoder_decoder", False) else out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
