"""LLaVA's prompt: the image token and the template a question is put in (no heavy imports:
stage `check` reads it)."""

from __future__ import annotations

from unlearn.errors import UnlearnError

IMAGE_TOKEN = "<image>"


def check_template(template: str, key: str = "vlm.template") -> str:
    """A prompt template holds the image token once and `{}` (the question) once."""
    if template.count(IMAGE_TOKEN) != 1 or template.count("{}") != 1:
        raise UnlearnError(f"{key} is {template!r}: it needs the image token {IMAGE_TOKEN} once and {{}} (the question) once, "
                           f"e.g. 'USER: {IMAGE_TOKEN}\\n{{}} ASSISTANT:'")
    return template


def prompt(template: str, question: str) -> str:
    return template.replace("{}", question)
