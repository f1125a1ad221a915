"""Default prompt wording (overridable in every config) and the chat messages built from it."""

from __future__ import annotations

SYSTEM_PROMPT = "You make choices on behalf of many different people, each with their own tastes."
DECISION_PROMPT = (
    "Pick the better of the two options below. Reply with one letter, A or B, and nothing else.\n\n"
)


def chat_messages(system: str, user: str, answer: str | None = None) -> list[dict[str, str]]:
    """System (omitted when empty) + user message, plus the assistant answer when given."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages
