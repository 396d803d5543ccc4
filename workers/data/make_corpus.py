"""Regenerates corpus.txt (the tokenizer training text) deterministically.

Run `python workers/data/make_corpus.py`; the output is committed, so nothing runs at install time.
Changing the corpus changes the tokenizer (it is cached by corpus hash) and every tiny model.
"""
import pathlib
import random

rng = random.Random(1234)

PARAGRAPHS = [
    "The river ran quietly past the old mill, carrying leaves from the hills down to the sea. "
    "In the morning the fishermen pushed their boats into the water and waited for the mist to lift.",
    "Once upon a time, in a village at the edge of a great forest, there lived a baker who rose "
    "every day before the sun. Her bread was famous for miles around, and travellers would stop "
    "at her door just to breathe in the smell of warm loaves.",
    "A computer program is a list of instructions that a machine follows one step at a time. "
    "Good programs are written for people to read, and only incidentally for machines to run.",
    "The weather today will be mostly sunny, with a light breeze from the west. Temperatures "
    "will reach twenty-two degrees in the afternoon before falling to twelve overnight.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to make sugar and oxygen. It takes place mainly in the leaves, inside small structures "
    "called chloroplasts.",
    "When you travel by train across the country, you see the landscape change slowly: flat "
    "farmland gives way to rolling hills, then to mountains, and finally to the long grey coast.",
    "The museum opens at nine o'clock and closes at five. Tickets can be bought at the entrance "
    "or online, and children under twelve enter for free.",
    "Learning a language takes patience. Read a little every day, listen to native speakers, "
    "and do not be afraid to make mistakes, because every mistake teaches you something new.",
    "The committee met on Tuesday to discuss the new budget. After a long debate, the members "
    "agreed to spend more on schools and libraries, and less on roads.",
    "Stars are enormous balls of hot gas that shine because of nuclear fusion in their cores. "
    "The nearest star to Earth is the Sun; the next nearest is more than four light years away.",
    "To make a simple soup, chop two onions, three carrots and a stalk of celery. Fry them "
    "gently in olive oil, add a litre of stock, and simmer for twenty minutes.",
    "He opened the letter with trembling hands. It was short, only three lines long, but it "
    "changed everything he thought he knew about his family.",
    "Distributed systems are hard because machines fail, networks drop messages, and clocks "
    "disagree. A well designed system assumes that anything can fail at any time.",
    "The cat sat on the windowsill and watched the birds in the garden. Every few minutes its "
    "tail twitched, but it never moved from its warm spot in the sun.",
    "Mathematics is the study of patterns. Numbers, shapes, and functions are all ways of "
    "describing regularities that we find in the world and in our own thinking.",
]

CODE = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "import json\n\nwith open('config.json') as f:\n    config = json.load(f)\nprint(config['name'])\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n        print(i, 'is odd')\n",
    "function add(a, b) {\n  return a + b;\n}\n\nconsole.log(add(2, 3));\n",
    "#include <stdio.h>\n\nint main(void) {\n    printf(\"hello, world\\n\");\n    return 0;\n}\n",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;\n",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n"
    "    left = [x for x in xs[1:] if x < pivot]\n    right = [x for x in xs[1:] if x >= pivot]\n"
    "    return quicksort(left) + [pivot] + quicksort(right)\n",
    "let total = 0;\nfor (const value of values) {\n  total += value;\n}\n",
    "fn main() {\n    let v = vec![1, 2, 3];\n    println!(\"{:?}\", v);\n}\n",
]

NAMES = "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Liam Maria Noah Olivia Peter Quinn Rosa Sam Tara".split()
NOUNS = ("house garden river city book letter window table road mountain forest ocean teacher doctor "
         "student engineer farmer child dog cat bird tree flower song story idea question answer problem "
         "machine computer program server network model language number picture market village bridge "
         "train ship car bicycle kitchen school library museum hospital office friend family morning evening "
         "winter summer spring autumn day night week year history science music paint paper water fire "
         "stone cloud rain snow wind sun moon star planet garden door key map clock coffee bread apple").split()
ADJS = ("small large old new quiet loud bright dark warm cold quick slow happy sad careful strange simple "
        "difficult beautiful green blue red yellow heavy light ancient modern gentle busy empty full "
        "curious patient brave tired famous hidden early late").split()
VERBS_PAST = ("walked found opened closed built painted wrote read watched heard carried followed visited "
              "remembered forgot noticed cleaned fixed moved crossed climbed answered asked explained "
              "discovered described shared").split()
VERBS = ("walk find open close build paint write read watch hear carry follow visit remember forget notice "
         "clean fix move cross climb answer ask explain discover describe share").split()
ADVS = "slowly quickly carefully quietly happily suddenly finally often rarely always".split()
PLACES = ("in the city", "by the river", "near the station", "at the market", "on the hill",
          "in the old library", "behind the school", "across the bridge", "under the trees", "at home")
TIMES = ("Yesterday", "Last week", "Every morning", "In the evening", "On Sunday", "Long ago",
         "This year", "At midnight", "After lunch", "Before dawn")
TOPICS = ("the weather", "a good book", "the new project", "dinner plans", "the train schedule",
          "a math problem", "their favourite music", "the garden", "a trip to the coast", "the meeting")


def a(xs):
    return rng.choice(xs)


def sentence():
    kind = rng.randrange(6)
    if kind == 0:
        return f"{a(TIMES)}, {a(NAMES)} {a(VERBS_PAST)} the {a(ADJS)} {a(NOUNS)} {a(PLACES)}."
    if kind == 1:
        return f"The {a(ADJS)} {a(NOUNS)} was {a(ADJS)}, and the {a(NOUNS)} {a(VERBS_PAST)} it {a(ADVS)}."
    if kind == 2:
        return f"{a(NAMES)} and {a(NAMES)} {a(VERBS_PAST)} a {a(ADJS)} {a(NOUNS)} {a(PLACES)}."
    if kind == 3:
        return f"Why did the {a(NOUNS)} {a(VERBS)} the {a(NOUNS)}? Nobody knew, but it happened {a(ADVS)}."
    if kind == 4:
        n = rng.randrange(2, 999)
        return f"There were {n} {a(NOUNS)}s {a(PLACES)}, and {rng.randrange(1, n)} of them were {a(ADJS)}."
    return f"If you {a(VERBS)} the {a(NOUNS)} {a(ADVS)}, the {a(NOUNS)} will become {a(ADJS)}."


def prose():
    return " ".join(sentence() for _ in range(rng.randrange(3, 8)))


def dialogue():
    x, y = rng.sample(NAMES, 2)
    topic = a(TOPICS)
    lines = [f"{x}: Hi {y}, do you have a minute to talk about {topic}?",
             f"{y}: Of course. What do you want to know?"]
    for _ in range(rng.randrange(2, 5)):
        lines.append(f"{x}: I think the {a(ADJS)} {a(NOUNS)} should {a(VERBS)} the {a(NOUNS)}.")
        lines.append(f"{y}: Really? I always {a(VERBS)} it {a(ADVS)} {a(PLACES)}.")
    lines.append(f"{x}: Thanks, that helps a lot.")
    return "\n".join(lines)


def chat():
    q = f"Can you {a(VERBS)} the {a(ADJS)} {a(NOUNS)} for me?"
    r = f"Sure! I will {a(VERBS)} the {a(NOUNS)} {a(ADVS)}. {sentence()}"
    return f"User: {q}\nAssistant: {r}"


def code():
    name = a(NOUNS)
    k = rng.randrange(1, 100)
    gen = rng.randrange(4)
    if gen == 0:
        return (f"def count_{name}s(items):\n    total = 0\n    for item in items:\n"
                f"        if item.kind == '{name}':\n            total += {k}\n    return total\n")
    if gen == 1:
        return (f"class {name.capitalize()}:\n    def __init__(self, size={k}):\n        self.size = size\n\n"
                f"    def __repr__(self):\n        return f\"{name.capitalize()}(size={{self.size}})\"\n")
    if gen == 2:
        return f"const {name}Count = items.filter((x) => x.type === \"{name}\").length * {k};\n"
    return f"# {a(ADJS)} {name}\nresult = [{', '.join(str(rng.randrange(100)) for _ in range(rng.randrange(3, 9)))}]\nprint(sum(result))\n"


def numbers():
    xs = [rng.randrange(1000) for _ in range(4)]
    return f"{xs[0]} + {xs[1]} = {xs[0] + xs[1]}; {xs[2]} * {xs[3]} = {xs[2] * xs[3]}."


chunks = []
while sum(len(c) for c in chunks) < 400_000:
    r = rng.random()
    if r < 0.04:
        chunks.append(a(PARAGRAPHS))
    elif r < 0.07:
        chunks.append(a(CODE))
    elif r < 0.45:
        chunks.append(prose())
    elif r < 0.6:
        chunks.append(dialogue())
    elif r < 0.72:
        chunks.append(chat())
    elif r < 0.9:
        chunks.append(code())
    else:
        chunks.append(numbers())
text = "\n\n".join(PARAGRAPHS + CODE + chunks) + "\n"
text += "Unicode: café, naïve, Zürich, 東京, Москва, αβγ, emoji 🙂.\n"
(pathlib.Path(__file__).parent / "corpus.txt").write_text(text, encoding="utf-8")
print(len(text))
