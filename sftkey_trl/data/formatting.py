"""Render (question, reasoning, answer) triples into training text, with the character offsets of the response,
the key and the end of the turn. Both stages and evaluation use exactly this rendering."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SFTKeyError
from .adapters import Triple

RESPONSE_FORMATS = ("tags", "plain")  # how a response is laid out (`Formatter.response`) and read back (evaluation)


@dataclass(frozen=True)
class Tags:
    """The tag strings of the "tags" response format."""

    thinking_open: str = "<Thinking>"
    thinking_close: str = "</Thinking>"
    answer_open: str = "<Answer>"
    answer_close: str = "</Answer>"

    def __post_init__(self) -> None:
        if not all((self.thinking_open, self.thinking_close, self.answer_open, self.answer_close)):
            raise ValueError("Tags: every tag string must be non-empty")


def one_answer_slot(template: str) -> bool:
    """Whether the plain format's `answer_template` holds `{answer}` exactly once (where the answer is read)."""
    return template.count("{answer}") == 1


@dataclass(frozen=True)
class Rendered:
    """A rendered training example: `text[:prompt_end]` is the prompt, the completion runs to `completion_end`
    (the end-of-turn/EOS token included) and the key starts at `key_start`."""

    text: str
    prompt_end: int
    key_start: int
    completion_end: int


class Formatter:
    """Turns triples into prompts and responses the same way for training and generation: through the chat
    template (the model's or the recipe's), else the plain layout `[bos]` + `prompt_template` + response + EOS."""

    def __init__(self, tokenizer, script_args, eos_token: str | None = None):
        self.tokenizer = tokenizer
        self.response_format = script_args.response_format
        self.tags = Tags(
            script_args.thinking_open, script_args.thinking_close, script_args.answer_open, script_args.answer_close
        )
        self.answer_template = script_args.answer_template
        self.system_prompt = script_args.system_prompt
        self.prompt_template = script_args.prompt_template
        if script_args.chat_template:
            template = script_args.chat_template
            if template.endswith((".jinja", ".j2")):
                if not Path(template).is_file():
                    raise SFTKeyError(f"`chat_template` file `{template}` does not exist")
                template = Path(template).read_text()
            tokenizer.chat_template = template
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.end_of_turn = eos_token or tokenizer.eos_token
        if not self.end_of_turn:
            raise SFTKeyError("the tokenizer has no EOS token; set `eos_token` in the recipe to its end-of-turn token")

    def response(self, triple: Triple) -> tuple[str, int]:
        """The response text and the character offset where its key (what stage 2 trains on) starts."""
        if self.response_format == "tags":
            thinking = f"{self.tags.thinking_open}{triple.reasoning}{self.tags.thinking_close}"
            return f"{thinking}\n{self.tags.answer_open}{triple.answer}{self.tags.answer_close}", len(thinking)
        answer_line = self.answer_template.format(answer=triple.answer)
        return f"{triple.reasoning}\n{answer_line}", len(triple.reasoning) + 1

    def _messages(self, question: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": question}]

    def prompt(self, question: str) -> str:
        """The text a model is given at generation time: identical to the training prompt."""
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                self._messages(question), tokenize=False, add_generation_prompt=True
            )
        bos = self.tokenizer.bos_token or ""
        system = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        return bos + system + self.prompt_template.format(question=question)

    def render(self, triple: Triple) -> Rendered:
        """Render one example and locate its prompt/key/end-of-turn boundaries in the text."""
        prompt = self.prompt(triple.question)
        response, key_offset = self.response(triple)
        if not self.use_chat_template:
            text = prompt + response + self.end_of_turn
            return Rendered(text, len(prompt), len(prompt) + key_offset, len(text))
        messages = self._messages(triple.question) + [{"role": "assistant", "content": response}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not text.startswith(prompt):
            raise SFTKeyError(
                "the chat template renders the prompt differently with and without the answer, so training and "
                "generation would disagree; set `chat_template` in the recipe to a template without that behaviour"
            )
        start = text.find(response, len(prompt))
        if start < 0:
            raise SFTKeyError(
                "the chat template rewrites the assistant message (the response is not in the rendered text); "
                "set `chat_template` in the recipe to a template that keeps the assistant content as is"
            )
        end_of_turn = text.find(self.end_of_turn, start + len(response))
        if end_of_turn < 0:
            raise SFTKeyError(
                f"the chat template does not close the assistant turn with `{self.end_of_turn}`; set `eos_token` in "
                "the recipe to the template's end-of-turn token so that generation learns to stop"
            )
        return Rendered(text, len(prompt), start + key_offset, end_of_turn + len(self.end_of_turn))
