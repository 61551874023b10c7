"""Teacher prompting and candidate generation (Montessori-Instruct, Li, Yu, Xiong, ICLR 2025).

A teacher LM writes synthetic training data for a student in two sampling passes, as in the
paper's code (src/gen_instructions.py):

1. *instructions*: the teacher sees an instruction-writing prompt holding `in_context` (8) seed
   instructions and samples k (4) candidate instructions per prompt (paper: T=1.0, top-p 0.9);
   the instruction is extracted from the raw output and filtered (length, banned words, names
   that must never reach training data);
2. *responses*: the teacher answers each instruction once (paper: T=0.6, top-p 0.9).

`preference_pairs` turns the candidates' local data influence into DPO pairs: within one prompt,
every positive x negative candidate becomes (chosen, rejected) on the *raw instruction text*,
prompts without both signs are dropped. `random_pairs` is the ablation.

Generation runs in-process (`TeacherGenerator`) or on a pool of Ray actors that each load the
teacher once and hold it (`generate_candidates(..., num_actors > 0)`); both give the same rows for
the same seed, because every prompt gets its own generator seed.

The tiny world's teacher: `world_seed_pool` is the seed-instruction pool (the Alpaca-GPT4
analog: well-formed questions and requests about the world's training people, with correct
responses), and `teacher_sft_data` is what makes a *mediocre* tiny teacher: its instruction
writing mixes on-target questions with off-target requests and questions about people nobody
knows, and its answers are sometimes wrong or malformed.
"""

from __future__ import annotations

import contextlib
import random
import re
from typing import Callable, Iterable, Iterator, Sequence

from pydantic import Field, field_validator

from cluster.config import Options
from synth import world as W

# ---------------------------------------------------------------------------------------------
# options


class SamplingOptions(Options):
    """One generation pass (HF `generate` sampling settings)."""

    temperature: float = Field(1.0, ge=0, description="sampling temperature; 0: greedy")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(64, gt=0, description="generation budget per sample")
    repetition_penalty: float = Field(1.0, gt=0, description="HF repetition penalty (1: none)")


class PromptOptions(Options):
    """How the teacher is prompted and how its output is read."""

    instruction_template: str = Field(
        "Write one new question like these.\n{examples}New question:\n",
        description="instruction-writing prompt; {examples} becomes the in-context seed instructions")
    example_format: str = Field("- {instruction}\n", description="one in-context instruction ({i}: its 1-based index)")
    in_context: int = Field(8, ge=1, description="seed instructions shown per prompt (paper: 8)")
    instruction_pattern: str | None = Field(
        None, description="regex whose first group is the instruction in the raw output; null: the first non-empty line")
    response_template: str = Field("Question: {instruction}\n", description="prompt the teacher answers an instruction from")
    chat: bool = Field(False, description="wrap both teacher prompts in the tokenizer's chat template (instruct teachers)")
    min_chars: int = Field(5, ge=1, description="shortest instruction kept (paper: 5)")
    max_chars: int = Field(400, ge=1, description="longest instruction kept (paper: 400)")
    banned_words: list[str] = Field(
        ["image", "graph", "picture", "file", "map", "draw", "plot", "go to"],
        description="instructions containing any of these (case-insensitive) are dropped (paper's keyword filter)")


# ---------------------------------------------------------------------------------------------
# prompts and parsing


def teacher_prompts(seed_instructions: Sequence[str], n_prompts: int, opts: PromptOptions, seed: int,
                    prefix: str = "p") -> list[dict]:
    """`n_prompts` instruction-writing prompts, each with `opts.in_context` distinct random seeds.

    Rows: prompt_id, prompt (the text the teacher continues), examples (the seeds shown).
    """
    if not seed_instructions:
        raise ValueError("no seed instructions")
    rng = random.Random(f"prompts-{seed}")
    n = min(opts.in_context, len(seed_instructions))
    rows = []
    for i in range(n_prompts):
        shown = rng.sample(list(seed_instructions), n)
        examples = "".join(opts.example_format.format(i=j + 1, instruction=s) for j, s in enumerate(shown))
        rows.append({"prompt_id": f"{prefix}{i:05d}", "prompt": opts.instruction_template.format(examples=examples),
                     "examples": shown})
    return rows


def extract_instruction(raw: str, opts: PromptOptions) -> str | None:
    """The instruction in a raw teacher output, or None when there is none."""
    if opts.instruction_pattern:
        m = re.search(opts.instruction_pattern, raw, flags=re.S)
        text = m.group(1) if m else ""
    else:
        text = next((line for line in raw.splitlines() if line.strip()), "")
    text = text.strip()
    return text or None


def keep_instruction(instruction: str | None, opts: PromptOptions, banned_names: Iterable[str] = ()) -> bool:
    """Paper's filters (length, keywords), plus names that must never reach training data (the
    generator applies the same name check to the response)."""
    if instruction is None or not opts.min_chars <= len(instruction) <= opts.max_chars:
        return False
    low = instruction.lower()
    if any(w.lower() in low for w in opts.banned_words):
        return False
    return not any(n in instruction for n in banned_names)


def format_teacher_prompt(text: str, tokenizer, chat: bool) -> str:
    """A prompt as the teacher sees it: raw text, or a one-turn chat for instruct teachers."""
    if not chat:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# generation


class TeacherGenerator:
    """A teacher held in memory that writes candidates for prompts (one Ray actor holds one).

    `generate(prompt_rows, k, seed)` returns, per prompt, k candidates (rows: id, prompt_id,
    prompt, raw, instruction, response, kept). Sampling is seeded per prompt, so results do not
    depend on how prompts are batched or which actor gets them.
    """

    def __init__(self, model_dir: str, tokenizer_dir: str, prompt: PromptOptions, instruction: SamplingOptions,
                 response: SamplingOptions, banned_names: Sequence[str] = (), device: str = "cpu",
                 dtype: str | None = None, batch_size: int = 64, threads: int | None = None):
        import torch

        from cluster.models import load_model, load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.tok = load_tokenizer(tokenizer_dir)
        self.model = load_model(model_dir, dtype=dtype, device=device).eval()
        self.prompt, self.inst, self.resp = prompt, instruction, response
        self.banned = list(banned_names)
        self.device, self.batch_size = device, batch_size

    def ready(self) -> bool:
        return True

    def _sample(self, texts: list[str], opts: SamplingOptions, seed: int, n: int = 1) -> list[str]:
        """n samples for each text (left-padded batches), seeded once per call."""
        import torch

        out: list[str] = []
        side, self.tok.padding_side = self.tok.padding_side, "left"
        torch.manual_seed(seed)
        try:
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=not self.prompt.chat).to(self.device)
                kw = dict(do_sample=opts.temperature > 0, max_new_tokens=opts.max_new_tokens,
                          repetition_penalty=opts.repetition_penalty, num_return_sequences=n,
                          pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
                if opts.temperature > 0:
                    kw.update(temperature=opts.temperature, top_p=opts.top_p)
                with torch.no_grad():
                    gen = self.model.generate(**enc, **kw)
                out += self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        finally:
            self.tok.padding_side = side
        return out

    def generate(self, prompt_rows: list[dict], k: int, seed: int) -> list[dict]:
        """k candidates per prompt; the sampling seed comes from `seed` and the batch's first prompt,
        so a batch gives the same rows on any actor."""
        if not prompt_rows:
            return []
        s = _prompt_seed(seed, prompt_rows[0]["prompt_id"])
        texts = [format_teacher_prompt(r["prompt"], self.tok, self.prompt.chat) for r in prompt_rows]
        raws = self._sample(texts, self.inst, s, n=k)
        rows = []
        for i, r in enumerate(prompt_rows):
            for j in range(k):
                raw = raws[i * k + j]
                inst = extract_instruction(raw, self.prompt)
                rows.append({"id": f"{r['prompt_id']}-{j}", "prompt_id": r["prompt_id"], "prompt": r["prompt"],
                             "raw": raw, "instruction": inst or "", "response": "",
                             "kept": keep_instruction(inst, self.prompt, self.banned)})
        todo = [row for row in rows if row["kept"]]
        answers = self._sample(
            [format_teacher_prompt(self.prompt.response_template.format(instruction=row["instruction"]), self.tok,
                                   self.prompt.chat) for row in todo],
            self.resp, s + 1)
        for row, a in zip(todo, answers):
            row["response"] = a.strip()
            row["kept"] = bool(row["response"]) and not any(n in row["response"] for n in self.banned)
        return rows


def _prompt_seed(seed: int, key: str) -> int:
    return random.Random(f"{seed}-{key}").randrange(2**31)


@contextlib.contextmanager
def open_generator(make_generator: Callable[[], TeacherGenerator], num_actors: int = 0, num_cpus_per_actor: float = 1,
                   num_gpus_per_actor: float = 0, batch_size: int = 16) -> Iterator[Callable[[list[dict], int, int], list[dict]]]:
    """A teacher loaded once, in-process (num_actors=0) or on Ray actors, for any number of
    `write(prompt_rows, k, seed)` calls, each giving k candidates per prompt in prompt order.

    The actors each call `make_generator()` once and take batches of prompts from a queue
    (`ray.util.ActorPool`), so a slow actor never holds up the rest.
    """
    def split(prompt_rows: list[dict]) -> list[list[dict]]:
        return [prompt_rows[i:i + batch_size] for i in range(0, len(prompt_rows), batch_size)]

    if num_actors == 0:
        gen = make_generator()
        yield lambda prompt_rows, k, seed: [row for b in split(prompt_rows) for row in gen.generate(b, k, seed)]
        return
    import ray
    from ray.util import ActorPool

    cls = ray.remote(_GeneratorActor).options(num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor)
    actors = [cls.remote(make_generator) for _ in range(num_actors)]

    def write(prompt_rows: list[dict], k: int, seed: int) -> list[dict]:
        results = ActorPool(actors).map(lambda a, b: a.generate.remote(b, k, seed), split(prompt_rows))
        return [row for part in results for row in part]

    try:
        yield write
    finally:
        for a in actors:
            ray.kill(a)


def generate_candidates(make_generator: Callable[[], TeacherGenerator], prompt_rows: list[dict], k: int, seed: int,
                        num_actors: int = 0, num_cpus_per_actor: float = 1, num_gpus_per_actor: float = 0,
                        batch_size: int = 16) -> list[dict]:
    """One `open_generator` call: k candidates per prompt, in prompt order."""
    with open_generator(make_generator, num_actors, num_cpus_per_actor, num_gpus_per_actor, batch_size) as write:
        return write(prompt_rows, k, seed)


class _GeneratorActor:
    def __init__(self, make_generator: Callable[[], TeacherGenerator]):
        self.gen = make_generator()

    def generate(self, prompt_rows: list[dict], k: int, seed: int) -> list[dict]:
        return self.gen.generate(prompt_rows, k, seed)


# ---------------------------------------------------------------------------------------------
# preference pairs


def preference_pairs(candidates: Sequence[dict], influence: dict[str, float]) -> list[dict]:
    """Montessori pairs: within a prompt, every positive x negative candidate is (chosen, rejected).

    `influence` maps candidate id -> I(z) (> 0: the step on z lowered the reference loss).
    Chosen/rejected are the raw teacher outputs; prompts lacking either sign give no pairs.
    Rows: prompt_id, prompt, chosen, rejected, chosen_id, rejected_id, margin.
    """
    rows = []
    for pid, group in _groups(candidates, influence).items():
        pos = [c for c in group if influence[c["id"]] > 0]
        neg = [c for c in group if influence[c["id"]] < 0]
        for c in pos:
            for r in neg:
                rows.append(_pair(c, r, influence[c["id"]] - influence[r["id"]]))
    return rows


def random_pairs(candidates: Sequence[dict], influence: dict[str, float], seed: int) -> list[dict]:
    """Ablation: the same prompts and number of pairs as `preference_pairs`, but chosen and
    rejected drawn at random from the prompt's candidates (influence ignored)."""
    rng = random.Random(f"random-pairs-{seed}")
    rows = []
    for pid, group in _groups(candidates, influence).items():
        n_pos = sum(influence[c["id"]] > 0 for c in group)
        n_neg = sum(influence[c["id"]] < 0 for c in group)
        for _ in range(n_pos * n_neg):
            c, r = rng.sample(group, 2)
            rows.append(_pair(c, r, float("nan")))
    return rows


def _groups(candidates: Sequence[dict], influence: dict[str, float]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for c in candidates:
        if c["id"] in influence:
            groups.setdefault(c["prompt_id"], []).append(c)
    return groups


def _pair(c: dict, r: dict, margin: float) -> dict:
    return {"prompt_id": c["prompt_id"], "prompt": c["prompt"], "chosen": c["raw"], "rejected": r["raw"],
            "chosen_id": c["id"], "rejected_id": r["id"], "margin": margin}


# ---------------------------------------------------------------------------------------------
# the tiny world's seeds and teacher


class TeacherMix(Options):
    """What the tiny teacher learns to write (shares of instruction kinds) and how well it answers."""

    single: float = Field(0.5, ge=0, description="single-hop questions about a training person (the target skill's format)")
    multi: float = Field(0.0, ge=0, description="two-hop (friend-of) questions")
    bio: float = Field(0.0, ge=0, description="off-target requests: 'Tell me about X.' answered with facts")
    guess: float = Field(0.45, ge=0, description="'Where does X live? Take a guess.': answered with an invented (wrong) fact")
    unknown: float = Field(0.05, ge=0, description="single-hop questions about people who do not exist (answers invented)")
    unknown_people: int = Field(64, ge=1, description="how many invented people the teacher asks about")
    blind_spots: list[str] = Field([], description="attributes the teacher mostly gets wrong (its blind spots)")
    blind_wrong: float = Field(0.9, ge=0, le=1, description="share of blind-spot answers with an invented, wrong value")
    wrong_answer: float = Field(0.03, ge=0, le=1, description="share of other answers with a wrong (consistently argued) answer")
    malformed: float = Field(0.02, ge=0, le=1, description="share of other answers whose chain cites the wrong fact")

    @field_validator("blind_spots")
    @classmethod
    def _known_attributes(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in W.ATTRIBUTES]
        if bad:
            raise ValueError(f"unknown attribute {bad[0]!r} (expected some of {sorted(W.ATTRIBUTES)})")
        return v


KINDS = ("single", "multi", "bio", "guess", "unknown")
GUESSES: dict[str, str] = {a: q + " Take a guess." for a, q in W.QUESTIONS.items()}  # invites an invented answer


def _bio_request(name: str) -> str:
    return f"Tell me about {name}."


def _bio_response(world: W.World, name: str, rng: random.Random) -> str:
    p = world.by_name(name)
    rels = rng.sample(list(W.ATTRIBUTES), 2)
    return " ".join(W.fact(name, r, p.facts[r]) for r in rels)


def world_seed_pool(world: W.World, people: Sequence[W.Person], seed: int, size: int) -> list[dict]:
    """Seed instructions with correct responses (the Alpaca-GPT4 analog): single-hop, two-hop and
    'tell me about' requests about `people`, in equal shares. Rows: id, kind, instruction, response."""
    rng = random.Random(f"seed-pool-{seed}")
    qs = W.questions(world, list(people), "seed")
    names = {p.name for p in people}
    single = [q for q in qs if q["kind"] == "single"]
    # two-hop chains name the friend: keep those whose friend is one of `people` (no held-out leak)
    multi = [q for q in qs if q["kind"] == "multi" and world.by_name(q["person"]).facts["friend"] in names]
    rows = []
    for i in range(size):
        kind = ("single", "multi", "bio")[i % 3]
        if kind == "bio":
            p = rng.choice(people)
            inst, resp = _bio_request(p.name), _bio_response(world, p.name, rng)
        else:
            q = rng.choice(single if kind == "single" else multi)
            inst, resp = q["question"], q["true_response"]
        rows.append({"id": f"seed-{i:05d}", "kind": kind, "instruction": inst, "response": resp})
    return rows


def unknown_names(world: W.World, n: int) -> list[str]:
    """Names of people who are not in the world (the teacher invents facts about them)."""
    other = W.build_world(W.WorldOptions(seed=world.seed + 10_007, num_people=max(8, 2 * n)))
    known = {p.name for p in world.people}
    return [p.name for p in other.people if p.name not in known][:n]


def _mediocre_answer(world: W.World, name: str | None, attr: str, multi: bool, mix: TeacherMix,
                     rng: random.Random) -> str:
    """The tiny teacher's answer: true chain, or wrong answer, or a chain citing the wrong fact."""
    if name is None:  # an unknown person: invented fact
        v = rng.choice(W.ATTRIBUTES[attr])
        return W.format_response([W.fact("{n}", attr, v)], v)
    p = world.by_name(name)
    chain: list[str] = []
    subject = p
    if multi:
        subject = world.by_name(p.facts["friend"])
        chain.append(W.fact(p.name, "friend", subject.name))
    truth = subject.facts[attr]
    u = rng.random()
    if u < (mix.blind_wrong if attr in mix.blind_spots else mix.wrong_answer):
        v = rng.choice([x for x in W.ATTRIBUTES[attr] if x != truth])
        return W.format_response(chain + [W.fact(subject.name, attr, v)], v)
    if attr not in mix.blind_spots and u < mix.wrong_answer + mix.malformed:
        other = rng.choice([a for a in W.ATTRIBUTES if a != attr])
        return W.format_response(chain + [W.fact(subject.name, other, subject.facts[other])], subject.facts[other])
    return W.format_response(chain + [W.fact(subject.name, attr, truth)], truth)


def teacher_sft_data(world: W.World, people: Sequence[W.Person], seed_pool: Sequence[dict], prompt: PromptOptions,
                     mix: TeacherMix, n_write: int, n_answer: int, seed: int) -> list[dict]:
    """SFT rows (prompt, completion) that make the tiny, mediocre teacher.

    Only `people` appear (two-hop chains too), so held-out people never reach a teacher or student.
    `n_write` instruction-writing examples: a prompt of `prompt.in_context` seed instructions, and
    a new instruction whose kind follows `mix` (about a random person of `people`, or an invented
    one for kind 'unknown'); `n_answer` answering examples in `prompt.response_template`, with the
    teacher's error rates. Invented people's answers name the invented person.
    """
    rng = random.Random(f"teacher-sft-{seed}")
    weights = [getattr(mix, k) for k in KINDS]
    names = {p.name for p in people}
    befriended = [p for p in people if p.facts["friend"] in names]  # two-hop chains stay among `people`
    ghosts = unknown_names(world, mix.unknown_people)
    seeds = [r["instruction"] for r in seed_pool]
    prompts = teacher_prompts(seeds, n_write, prompt, seed, prefix="t")

    def draw() -> tuple[str, str]:
        kind = rng.choices(KINDS, weights)[0]
        attr = rng.choice(list(W.QUESTIONS if kind != "multi" else W.MULTI_QUESTIONS))
        if kind == "bio":
            p = rng.choice(people)
            return _bio_request(p.name), _bio_response(world, p.name, rng)
        if kind == "guess":
            p = rng.choice(people)
            v = rng.choice([x for x in W.ATTRIBUTES[attr] if x != p.facts[attr]])
            return GUESSES[attr].format(n=p.name), W.format_response([W.fact(p.name, attr, v)], v)
        if kind == "unknown":
            g = rng.choice(ghosts)
            return W.QUESTIONS[attr].format(n=g), _mediocre_answer(world, None, attr, False, mix, rng).replace("{n}", g)
        p = rng.choice(people if kind == "single" else befriended)
        template = W.QUESTIONS if kind == "single" else W.MULTI_QUESTIONS
        return template[attr].format(n=p.name), _mediocre_answer(world, p.name, attr, kind == "multi", mix, rng)

    rows = []
    for pr in prompts:
        inst, _ = draw()
        rows.append({"prompt": pr["prompt"], "completion": inst})
    for _ in range(n_answer):
        inst, resp = draw()
        rows.append({"prompt": prompt.response_template.format(instruction=inst), "completion": resp})
    rng.shuffle(rows)
    return rows


def world_texts(prompt: PromptOptions) -> list[str]:
    """Fixed strings of the tiny teacher's prompts (added to the offline tokenizer's corpus)."""
    return [prompt.instruction_template.format(examples=""), _bio_request("X"), *(g.format(n="X") for g in GUESSES.values())] * 20


def classify(world: W.World, instruction: str, response: str) -> dict:
    """What a tiny-world example is (for reports, never for training): kind (single, multi, bio,
    guess, unknown, other), whether its response is exactly the true one (correct), and the
    attribute a question asks about (None for requests and unparseable text)."""
    names = {p.name for p in world.people}
    for attr, q in W.MULTI_QUESTIONS.items():
        m = re.fullmatch(re.escape(q).replace(re.escape("{n}"), "(.+)"), instruction)
        if m and m.group(1) in names:
            p = world.by_name(m.group(1))
            f = world.by_name(p.facts["friend"])
            truth = W.format_response([W.fact(p.name, "friend", f.name), W.fact(f.name, attr, f.facts[attr])], f.facts[attr])
            return {"kind": "multi", "correct": response == truth, "attribute": attr}
    for kind, templates in (("single", W.QUESTIONS), ("guess", GUESSES)):
        for attr, q in templates.items():
            m = re.fullmatch(re.escape(q).replace(re.escape("{n}"), "(.+)"), instruction)
            if m:
                if m.group(1) not in names:
                    return {"kind": "unknown", "correct": False, "attribute": attr}
                p = world.by_name(m.group(1))
                truth = W.format_response([W.fact(p.name, attr, p.facts[attr])], p.facts[attr])
                return {"kind": kind, "correct": response == truth, "attribute": attr}
    m = re.fullmatch(r"Tell me about (.+)\.", instruction)
    if m and m.group(1) in names:
        p = world.by_name(m.group(1))
        facts = {W.fact(p.name, a, p.facts[a]) + "" for a in W.ATTRIBUTES}
        sents = [s.strip() + "." for s in response.split(".") if s.strip()]
        return {"kind": "bio", "correct": bool(sents) and all(s in facts for s in sents), "attribute": None}
    return {"kind": "other", "correct": False, "attribute": None}
