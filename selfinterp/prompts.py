"""Default prompt wording (overridable in every config) and the chat messages built from it."""

from __future__ import annotations

SYSTEM_PROMPT = "You make choices on behalf of many different people, each with their own tastes."
DECISION_PROMPT = (
    "Pick the better of the two options below. Reply with one letter, A or B, and nothing else.\n\n"
)
# Curriculum questions about one attribute ("Which option has the higher price?"), placed before the
# trial text, whose first line is then that question instead of the scenario's.
ATTRIBUTE_PROMPT = "Answer the question about the two options below. Reply with one letter, A or B, and nothing else.\n\n"
# Experiment 2: the same trial text, preceded by a request for a self-report instead of a choice.
REPORT_PROMPT = (
    "Do not choose between the options below. Instead, report how heavily you weigh each of their five "
    "attributes when you make choices like this one, on a scale from -100 to 100: a positive weight means "
    "you prefer options with more of that attribute, a negative weight means you prefer less of it, and 0 "
    "means it does not matter to you. Reply only with a JSON object whose keys are the five attribute names, "
    "exactly as written below, and whose values are your weights as numbers, and nothing else.\n\n"
)


def chat_messages(system: str, user: str, answer: str | None = None) -> list[dict[str, str]]:
    """System (omitted when empty) + user message, plus the assistant answer when given."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages
