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

`TeacherGenerator` is the scorer of a `cluster.probes.ProbePool`: the teacher is loaded once per
actor (or once in-process), and every batch of prompts carries its own sampling seed, so the rows
do not depend on which actor wrote them; `pool_writer` runs it, `drop_copies` applies the paper's
duplicate filter, and `final_set` writes a final synthetic set round by round.

The tiny world's teacher: `world_seed_pool` is the seed-instruction pool (the Alpaca-GPT4
analog: well-formed questions and requests about the world's training people, with correct
responses), and `teacher_sft_data` is what makes a *mediocre* tiny teacher: its instruction
writing mixes on-target questions with off-target requests and questions about people nobody
knows, and its answers are sometimes wrong or malformed.
"""

from __future__ import annotations

import functools
import math
import random
import re
from typing import Callable, Iterable, Sequence

from pydantic import Field

from cluster.config import Options, UserError
from cluster.learners import LearnerOptions
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


class TeacherMix(Options):
    """What the tiny teacher learns to write (shares of instruction kinds) and how well it answers."""

    single: float = Field(0.5, ge=0, description="single-hop questions about a training person (the target skill's format)")
    multi: float = Field(0.0, ge=0, description="two-hop (friend-of) questions")
    bio: float = Field(0.0, ge=0, description="off-target requests: 'Tell me about X.' answered with facts")
    guess: float = Field(0.45, ge=0, description="'Where does X live? Take a guess.': answered with an invented (wrong) fact")
    unknown: float = Field(0.05, ge=0, description="single-hop questions about people who do not exist (answers invented)")
    unknown_people: int = Field(64, ge=1, description="how many invented people the teacher asks about")
    wrong_answer: float = Field(0.03, ge=0, le=1, description="share of answers with a wrong (consistently argued) answer")
    malformed: float = Field(0.02, ge=0, le=1, description="share of answers whose chain cites the wrong fact")


class GenerationOptions(Options):
    """Where teacher generation runs (a `cluster.probes.ProbePool` of teachers)."""

    num_actors: int = Field(0, ge=0, description="Ray actors holding a teacher each (0: in the driver process)")
    cpus_per_actor: float = Field(1, gt=0, description="logical CPUs per generation actor")
    gpus_per_actor: float = Field(0, ge=0, description="GPUs per generation actor")
    batch_size: int = Field(16, gt=0, description="prompts per generation call (each gives k candidates)")
    device: str = Field("cpu", description="device the teacher generates on")
    dtype: str | None = Field(None, description="torch dtype to load the teacher in (bfloat16 on GPUs); null: as saved")


class TeacherOptions(Options):
    """The teacher: which model, how it is prompted and how it samples."""

    model: str | None = Field(None, description="hub id or local dir of the teacher; null: a tiny teacher SFT'd from the student's pretrained base")
    tokenizer: str | None = Field(None, description="the teacher's tokenizer; null: the teacher model's (tiny: the student's). Must agree with the student's")
    sft: LearnerOptions | None = Field(None, description="SFT that makes the tiny teacher (null with a hub teacher)")
    sft_examples: int = Field(1200, ge=1, description="tiny teacher: instruction-writing examples (and as many answering examples)")
    mix: TeacherMix = Field(default_factory=TeacherMix, description="tiny teacher: what it learns to write and how well it answers")
    prompt: PromptOptions = Field(default_factory=PromptOptions, description="teacher prompts and output parsing")
    k: int = Field(4, ge=2, description="candidate instructions per prompt (paper: 4); pairs need at least 2")
    dedup: bool = Field(True, description="final sets: drop an instruction an earlier example already has (paper: ROUGE-L > 0.7 against all previous). Probing always drops copies within a prompt's candidates and of its in-context seeds")
    instruction_sampling: SamplingOptions = Field(default_factory=lambda: SamplingOptions(temperature=1.0, top_p=0.9), description="instruction pass (paper: T=1.0, top-p 0.9)")
    response_sampling: SamplingOptions = Field(default_factory=lambda: SamplingOptions(temperature=0.6, top_p=0.9), description="response pass (paper: T=0.6, top-p 0.9)")
    generation: GenerationOptions = Field(default_factory=GenerationOptions, description="where generation runs")


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
    """A teacher held in memory that writes candidates for prompts: the scorer of a
    `cluster.probes.ProbePool` (one per actor, or in-process with `num_actors=0`).

    `score(prompt_rows)` takes prompt rows (prompt_id, prompt, k, seed) and returns, per row, its k
    candidates (dicts: id, prompt_id, prompt, raw, instruction, response, kept). Sampling is seeded
    from the row's `seed` and the batch's first prompt id, so a batch gives the same candidates on
    any actor, and a resumed run (which batches the remaining prompts the same way) too.
    """

    def __init__(self, model: str, tokenizer: str, prompt: PromptOptions, instruction: SamplingOptions,
                 response: SamplingOptions, banned_names: Sequence[str] = (), device: str = "cpu",
                 dtype: str | None = None, batch_size: int = 64):
        from cluster.models import load_model, load_tokenizer
        from cluster.stages import fetch

        self.tok = load_tokenizer(fetch(tokenizer))
        self.model = load_model(fetch(model), dtype=dtype, device=device).eval()
        self.prompt, self.inst, self.resp = prompt, instruction, response
        self.banned = list(banned_names)
        self.device, self.batch_size = device, batch_size

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

    def score(self, prompt_rows: list[dict]) -> list[list[dict]]:
        """k candidates per prompt row (`k` and `seed` from the batch's first row)."""
        if not prompt_rows:
            return []
        k, s = prompt_rows[0]["k"], derive_seed(prompt_rows[0]["seed"], prompt_rows[0]["prompt_id"])
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
        return [rows[i * k:(i + 1) * k] for i in range(len(prompt_rows))]


def check_tokenizers(student_tok, teacher_tok: str) -> None:
    """Teacher and student must share a vocabulary (bad input otherwise): the tiny teacher starts
    from the student's weights, and a teacher that splits text differently is a different model
    family (the paper's Llama-3-8B-Instruct teacher and Llama-3-8B student share one; their EOS
    differs, which is fine: text, not token ids, passes from teacher to student)."""
    a, b = student_tok.get_vocab(), load_tokenizer_or_fail(teacher_tok, "teacher.tokenizer").get_vocab()
    if a != b:
        raise UserError(f"teacher.tokenizer ({teacher_tok}): the teacher's tokenizer disagrees with the student's "
                        f"(vocab {len(b)} vs {len(a)}, {len(set(a.items()) ^ set(b.items()))} entries differ)")


def load_tokenizer_or_fail(path: str, key: str):
    """A tokenizer (hub id, local dir or storage URI); one that cannot be loaded is bad input at `key`."""
    from cluster.models import load_tokenizer
    from cluster.stages import fetch

    try:
        return load_tokenizer(fetch(path))
    except Exception as exc:  # noqa: BLE001 - a missing/odd tokenizer is bad input
        raise UserError(f"{key}: cannot load a tokenizer from {path} ({type(exc).__name__})") from None


def open_teacher(opts: TeacherOptions, model: str, tokenizer: str, banned_names: Sequence[str]):
    """The teacher at `model` loaded once, on `opts.generation.num_actors` Ray actors (0: in this
    process): a `cluster.probes.ProbePool` of `TeacherGenerator`s for any number of `pool_writer` calls."""
    from cluster.probes import ProbePool

    g = opts.generation
    make = functools.partial(TeacherGenerator, str(model), str(tokenizer), opts.prompt, opts.instruction_sampling,
                             opts.response_sampling, banned_names=list(banned_names), device=g.device, dtype=g.dtype,
                             batch_size=g.batch_size * opts.k)
    return ProbePool(make, g.num_actors, g.cpus_per_actor, g.gpus_per_actor)


def derive_seed(seed: int, tag: str) -> int:
    """A sampling or shuffling seed of its own for `tag` (a prompt id, a stage, a round)."""
    return random.Random(f"{seed}-{tag}").randrange(2**31)


Write = Callable[[list[dict], int], list[dict]]  # (prompt rows, sampling seed) -> candidates, in prompt order


def pool_writer(pool, out: str, k: int, batch_size: int) -> Write:
    """`write(prompt_rows, seed)` on a `cluster.probes.ProbePool` of `TeacherGenerator`s: k
    candidates per prompt, `batch_size` prompts per call; finished batches are kept under `out` (a
    storage URI), so an interrupted stage resumes. Prompt ids must be unique across the calls."""
    def write(prompt_rows: list[dict], seed: int) -> list[dict]:
        items = [{**p, "k": k, "seed": seed} for p in prompt_rows]
        done = pool.run(items, "prompt_id", out=out, batch_size=batch_size, score_column="candidates",
                        progress=False, desc="teacher")
        return [c for cands in done["candidates"] for c in cands]
    return write


def drop_copies(rows: list[dict], prompts: list[dict], seen: set[str] | None = None) -> list[dict]:
    """As the paper drops near-duplicates: a candidate is no longer `kept` when it copies one of
    its prompt's in-context instructions or an earlier candidate of the same prompt, or (with
    `seen`, a set carried across calls) any earlier instruction. Marks `rows` in place."""
    shown = {p["prompt_id"]: set(p["examples"]) for p in prompts}
    for r in rows:
        if r["kept"] and (r["instruction"] in shown[r["prompt_id"]] or (seen is not None and r["instruction"] in seen)):
            r["kept"] = False
        if r["kept"]:
            shown[r["prompt_id"]].add(r["instruction"])
            if seen is not None:
                seen.add(r["instruction"])
    return rows


FINAL_ROUNDS = 20  # generation rounds for distinct examples, then as many allowing repeats


def final_set(write: Write, seed_instructions: Sequence[str], size: int, prompt: PromptOptions, k: int,
              dedup: bool, seed: int, label: str) -> list[dict]:
    """`size` kept examples from one teacher, round after round of fresh prompts. Every teacher of
    a seed gets the same prompts and sampling seeds (only the teacher differs)."""
    rows, seen = [], set() if dedup else None
    for rnd in range(2 * FINAL_ROUNDS):
        if len(rows) >= size:
            break
        if rnd == FINAL_ROUNDS and seen is not None:
            # a teacher DPO has narrowed may not have `size` distinct instructions in it: the set
            # keeps its size (the comparison is per example) and repeats; the report's `distinct`
            # column shows it
            print(f"[final] {label}: only {len(rows)} distinct examples in {FINAL_ROUNDS} rounds; "
                  "topping up with repeats", flush=True)
            seen = None
        need = max(16, math.ceil((size - len(rows)) * 1.25 / k) + 1)
        prompts = teacher_prompts(seed_instructions, need, prompt, seed=derive_seed(seed, f"final-{rnd}"),
                                  prefix=f"s{seed}-final{rnd}-p")
        rows += [r for r in drop_copies(write(prompts, derive_seed(seed, f"final-gen-{rnd}")), prompts, seen) if r["kept"]]
    if len(rows) < size:
        raise RuntimeError(f"{label}: the teacher wrote only {len(rows)} usable examples in {2 * FINAL_ROUNDS} rounds "
                           "(see the candidates stage's kept counts)")
    return rows[:size]


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


def dpo_row(pair: dict, chat: bool) -> dict:
    """A pair in TRL's preference format; conversational for chat teachers (TRL applies the template)."""
    if chat:
        return {"prompt": [{"role": "user", "content": pair["prompt"]}],
                "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                "rejected": [{"role": "assistant", "content": pair["rejected"]}]}
    return {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}


# ---------------------------------------------------------------------------------------------
# the tiny world's seeds and teacher


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
    if u < mix.wrong_answer:
        v = rng.choice([x for x in W.ATTRIBUTES[attr] if x != truth])
        return W.format_response(chain + [W.fact(subject.name, attr, v)], v)
    if u < mix.wrong_answer + mix.malformed:
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
