"""Chats made renderable by the tokenizer's chat template. Some templates have no system role
(Gemma 2 raises "System role not supported"); there the system text joins the first user turn,
as Gemma's own docs recommend, so a chat that opens with a system turn still trains and
generates. Templates that take a system turn get the chat unchanged.
"""

from __future__ import annotations

from typing import Dict, List

SYSTEM_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]

_accepts_system_by_template: Dict[str, bool] = {}
"""Template text -> whether it renders SYSTEM_PROBE: probed once per template, not per row."""


def accepts_system_turn(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a chat that opens with a system turn."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return True  # no template to probe: the real render says what is missing
    if template not in _accepts_system_by_template:
        from jinja2.exceptions import TemplateError  # transformers' raise_exception raises it

        try:
            tokenizer.apply_chat_template(SYSTEM_PROBE, tokenize=False)
            _accepts_system_by_template[template] = True
        except TemplateError:
            _accepts_system_by_template[template] = False
    return _accepts_system_by_template[template]


def fold_system_turn(tokenizer, messages: List[dict]) -> List[dict]:
    """The chat as the template can render it: a leading system turn joins the first user turn
    (system text, a blank line, the user text) when the template has no system role."""
    if not messages or messages[0]["role"] != "system" or accepts_system_turn(tokenizer):
        return messages
    system, rest = messages[0], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = dict(rest[0], content=f"{system['content']}\n\n{rest[0]['content']}")
        return rest
    return [dict(system, role="user")] + rest  # no user turn to join: the system text speaks as one
