"""The sample world: a generated MIND-format dataset whose click model is known.

Generative model (kept generic, like real news):

- Articles have a topic (17 topics over 7 coarse categories, so the category alone does not
  give the topic and the subcategory is drawn independently of it), a visual style (10 cover
  families, independent of the topic), a popularity latent ``z ~ N(0, 1)`` and a publication
  time. The topic is visible only in the text (headline, abstract, entities), the style only
  in the cover picture; ~10% of articles have no picture.
- Users like a few topics and a few styles (affinity in [0.6, 1] for liked ones, 0 otherwise)
  and have a lognormal activity level that sets how often they appear and how long their
  click history is (~5% have none).
- An article is shown with weight ``exp(z)`` (heavy-tailed exposure) among the articles
  published in the last ``freshness_days``, and a user clicks it with probability
  ``sigmoid(TOPIC_WEIGHT * topic_affinity + STYLE_WEIGHT * style_affinity
  + POPULARITY_WEIGHT * z + CLICK_BIAS)``.
- Every logged impression has at least one click, as in MIND: labels are drawn from the
  independent clicks conditioned on "at least one click", and ``truth.tsv`` records that
  conditional probability, ``p_i / (1 - prod_j (1 - p_j))``, so labels are calibrated to it.
- Histories are clicks simulated the same way before the training window (fixed per user).
  The test window follows the training window; about half of its candidates are articles
  published after training ended, which no training impression can have shown.

Everything is drawn from NumPy generators keyed by ``(seed, stream[, chunk or item])``, so a
world is the same bytes for the same arguments whatever the number of image workers.
"""

from __future__ import annotations

import json
import multiprocessing
import numbers
import os
import shutil
import tempfile
import time
import unicodedata
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from recsys.atomic import umasked
from recsys.data.covers import NUM_STYLES, STYLE_NAMES, draw_cover
from recsys.errors import ConfigError, RecsysError, disk_errors


class SampleError(RecsysError):
    """The output folder or a sample world's ``world.json`` cannot be used."""


# --------------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class Topic:
    """A news topic: its coarse category, how common it is, and its headline vocabulary.

    Subjects take the verb form of ``actions`` (plural team names take plural verbs).
    ``entities`` are (surface form, MIND entity type) pairs found in the phrases.
    """

    name: str
    category: str
    share: float
    subjects: tuple[str, ...]
    actions: tuple[str, ...]
    objects: tuple[str, ...]
    events: tuple[str, ...]
    entities: tuple[tuple[str, str], ...] = ()


TOPICS: tuple[Topic, ...] = (
    Topic(
        "politics", "news", 1.4,
        ("Senate panel", "House committee", "The White House", "Governor Alvarez", "Senator Whitfield",
         "State legislature", "Top Democrat", "GOP leader", "Rep. Okafor", "Congressional panel"),
        ("advances bill to curb", "blocks vote on", "unveils plan to overhaul", "pushes back on",
         "weighs new limits on", "calls for hearing on", "faces pressure over", "signals shift on",
         "clashes with Senate over", "strikes deal on"),
        ("drug prices", "student debt", "campaign finance rules", "border security funding",
         "gun background checks", "federal spending", "voting rights", "health care costs",
         "the minimum wage", "infrastructure spending", "tax credits"),
        ("the impeachment inquiry", "a looming government shutdown", "the budget standoff",
         "a closed-door hearing", "the filibuster debate", "a bipartisan spending deal",
         "a new ethics complaint", "the 2020 campaign"),
        (("Senate", "O"), ("White House", "B"), ("Alvarez", "P"), ("Whitfield", "P"), ("Okafor", "P"),
         ("GOP", "O"), ("Democrat", "O")),
    ),
    Topic(
        "crime", "news", 1.2,
        ("Police department", "Sheriff's office", "Federal prosecutor", "District attorney", "The FBI",
         "State police", "Lead detective", "Police chief", "Attorney general", "Transit police"),
        ("makes arrest in", "releases new details in", "reopens", "issues warning after",
         "seeks public's help in", "announces charges in", "faces questions over", "breaks silence on",
         "offers reward in", "closes investigation into"),
        ("deadly shooting", "string of burglaries", "carjacking spree", "cold case murder", "bank robbery",
         "hit-and-run crash", "online fraud scheme", "missing teen case", "armed standoff",
         "drug trafficking ring"),
        ("a manhunt", "the murder trial", "a police chase", "the sentencing hearing", "a wave of car thefts",
         "the jury verdict", "a school lockdown", "newly released bodycam video"),
        (("FBI", "O"),),
    ),
    Topic(
        "world", "news", 1.0,
        ("Prime minister", "Foreign ministry", "United Nations envoy", "European Union", "NATO",
         "Opposition leader", "President Moreau", "Protest movement", "Embassy", "Chancellor Lindqvist"),
        ("condemns", "calls for talks on", "warns of", "responds to", "seeks support for", "vows to end",
         "rejects demands over", "announces sanctions over", "reaches agreement on", "faces backlash over"),
        ("border clashes", "the refugee crisis", "trade tariffs", "the ceasefire", "snap elections",
         "the nuclear deal", "mass protests", "the peace process", "the currency crisis", "humanitarian aid"),
        ("the summit", "a wave of protests", "a diplomatic row", "the ceasefire talks", "a contested election",
         "the trade war", "a refugee surge", "the Brexit deadline"),
        (("United Nations", "O"), ("European Union", "O"), ("NATO", "O"), ("Moreau", "P"),
         ("Lindqvist", "P"), ("Brexit", "E")),
    ),
    Topic(
        "weather", "news", 0.8,
        ("Winter storm", "Cold front", "Tropical storm", "Arctic blast", "Storm system", "Nor'easter",
         "Lake-effect snow band", "Atmospheric river", "Weekend storm", "Ice storm"),
        ("brings", "threatens", "could bring", "delivers", "raises risk of", "sets stage for", "forces",
         "triggers"),
        ("heavy snow", "record cold", "flash flooding", "damaging winds", "power outages", "school closures",
         "travel delays", "icy roads", "evacuations", "the first freeze of the season"),
        ("the first snowfall", "a record-breaking cold snap", "hurricane season", "the holiday travel forecast",
         "a flood warning", "a severe weather outbreak", "the drought", "the wildfire season"),
        (("National Weather Service", "O"),),
    ),
    Topic(
        "football", "sports", 1.2,
        ("Patriots", "Cowboys", "Packers", "Chiefs", "Seahawks", "Steelers", "Ravens", "49ers", "Bears", "Eagles"),
        ("rally past", "hold off", "fall to", "edge", "cruise past", "stun", "beat", "rout", "lose to", "outlast"),
        ("the Giants", "the Jets", "the Rams", "the Vikings", "the Lions", "the Broncos", "the Saints",
         "the Bills", "the Texans", "the Colts"),
        ("the trade deadline", "a season-ending injury", "the playoff race", "Sunday's matchup",
         "the quarterback controversy", "the Thanksgiving game", "the draft", "a late fumble"),
        tuple((team, "O") for team in ("Patriots", "Cowboys", "Packers", "Chiefs", "Seahawks", "Steelers",
                                       "Ravens", "49ers", "Bears", "Eagles", "Giants", "Jets", "Rams",
                                       "Vikings", "Lions", "Broncos", "Saints", "Bills", "Texans", "Colts")),
    ),
    Topic(
        "basketball", "sports", 0.9,
        ("Lakers", "Celtics", "Warriors", "Bucks", "Clippers", "Raptors", "Nuggets", "Sixers", "Rockets", "Heat"),
        ("beat", "top", "edge", "blow out", "fall to", "hold off", "cruise past", "snap skid against",
         "outscore", "survive"),
        ("the Knicks", "the Nets", "the Suns", "the Jazz", "the Spurs", "the Mavericks", "the Kings",
         "the Pacers", "the Hawks", "the Magic"),
        ("a triple-double", "the buzzer-beater", "the All-Star vote", "a hamstring injury",
         "the three-point record", "the trade rumor mill", "double overtime", "the season opener"),
        tuple((team, "O") for team in ("Lakers", "Celtics", "Warriors", "Bucks", "Clippers", "Raptors",
                                       "Nuggets", "Sixers", "Rockets", "Heat", "Knicks", "Nets", "Suns",
                                       "Jazz", "Spurs", "Mavericks", "Kings", "Pacers", "Hawks", "Magic")),
    ),
    Topic(
        "soccer", "sports", 0.7,
        ("Liverpool", "Barcelona", "Bayern Munich", "Juventus", "Manchester City", "Paris Saint-Germain",
         "Ajax", "Atlético Madrid", "Inter Milan", "Borussia Dortmund"),
        ("beats", "draws with", "edges", "thrashes", "falls to", "holds off", "stuns",
         "comes from behind to beat", "knocks out", "crushes"),
        ("Chelsea", "Real Madrid", "Tottenham", "Napoli", "Sevilla", "Benfica", "Porto", "Arsenal",
         "AC Milan", "Valencia"),
        ("the Champions League draw", "a stoppage-time winner", "the transfer window", "the derby",
         "a red card", "the World Cup qualifier", "the penalty shootout", "the title race"),
        tuple((club, "O") for club in ("Liverpool", "Barcelona", "Bayern Munich", "Juventus", "Manchester City",
                                       "Paris Saint-Germain", "Ajax", "Atlético Madrid", "Inter Milan",
                                       "Borussia Dortmund", "Chelsea", "Real Madrid", "Tottenham", "Napoli",
                                       "Sevilla", "Benfica", "Porto", "Arsenal", "AC Milan", "Valencia",
                                       "Champions League", "World Cup")),
    ),
    Topic(
        "markets", "finance", 0.8,
        ("Dow", "S&P 500", "Nasdaq", "Oil price", "Gold", "Bitcoin", "Treasury yield", "Dollar", "Bank stock",
         "Chipmaker stock"),
        ("climbs on", "slips on", "rallies after", "tumbles on", "hits record on", "edges higher on",
         "slides as investors weigh", "swings on"),
        ("trade deal hopes", "strong jobs data", "earnings beats", "rate cut bets", "recession fears",
         "weak retail sales", "Fed comments", "tariff worries", "inflation data", "merger news"),
        ("the Fed meeting", "earnings season", "the jobs report", "a bond market selloff", "the trade talks",
         "an IPO frenzy", "the holiday shopping season", "a record buyback"),
        (("Dow", "O"), ("S&P 500", "O"), ("Nasdaq", "O"), ("Bitcoin", "O"), ("Fed", "O"), ("IPO", "C")),
    ),
    Topic(
        "real_estate", "finance", 0.6,
        ("Mortgage rate", "Home price index", "Housing market", "Rent growth", "Home builder",
         "Luxury condo market", "Real estate agent", "Landlord group", "First-time buyer", "Commercial property"),
        ("rises on", "falls despite", "cools on", "heats up on", "stalls over", "rebounds thanks to",
         "feels pinch from", "braces for"),
        ("tight inventory", "rising rates", "bidding wars", "new zoning rules", "a construction slowdown",
         "property tax hikes", "strong demand", "cooling sales", "a wave of foreclosures", "remote work trends"),
        ("the spring buying season", "a bidding war", "the housing shortage", "a new rent control law",
         "a mortgage refinance boom", "the open house", "a record home sale", "the renovation boom"),
    ),
    Topic(
        "medicine", "health", 0.9,
        ("New study", "FDA", "CDC", "Researcher", "Hospital", "Doctor", "Clinical trial", "Health department",
         "Vaccine maker", "Surgeon"),
        ("finds new clue to", "warns about", "approves treatment for", "tracks rise in", "raises alarm over",
         "tests new drug for", "reports breakthrough in", "urges screening for", "sheds light on",
         "issues guidance on"),
        ("flu cases", "Alzheimer's disease", "breast cancer", "antibiotic resistance", "heart disease",
         "measles outbreaks", "type 2 diabetes", "vaping illness", "chronic pain", "sleep apnea"),
        ("flu season", "a measles outbreak", "the vaping crisis", "a drug shortage", "the opioid epidemic",
         "a new cancer therapy", "a hospital merger", "the latest clinical trial"),
        (("FDA", "O"), ("CDC", "O"), ("Alzheimer's disease", "D")),
    ),
    Topic(
        "fitness", "health", 0.7,
        ("Trainer", "This workout", "Nutritionist", "Marathon runner", "Celebrity trainer", "Yoga instructor",
         "Fitness coach", "This simple routine", "Olympic athlete", "Physical therapist"),
        ("shares secret to", "reveals best way to", "explains how to", "swears by this plan to",
         "shows easy way to", "offers tips to", "says it's never too late to", "uses this trick to"),
        ("lose belly fat", "build muscle after 50", "run faster", "sleep better", "boost metabolism",
         "fix your posture", "strengthen your core", "stay motivated in winter", "recover from a long run",
         "eat more protein"),
        ("a 30-day plank challenge", "intermittent fasting", "the keto diet", "a high-intensity interval workout",
         "the New Year's resolution", "a strength training plan", "marathon season", "a morning stretch routine"),
    ),
    Topic(
        "recipes", "foodanddrink", 0.8,
        ("This recipe", "Chef", "Grandma's recipe", "Food blogger", "This one-pot dinner", "Test kitchen",
         "Home cook", "This slow cooker meal", "Pastry chef", "This sheet-pan supper"),
        ("puts new spin on", "makes easy work of", "transforms", "reinvents", "shows how to make", "perfects",
         "upgrades", "takes a shortcut with"),
        ("pumpkin pie", "Thanksgiving stuffing", "chicken soup", "mac and cheese", "banana bread", "beef stew",
         "roasted vegetables", "chocolate chip cookies", "lasagna", "mashed potatoes"),
        ("Thanksgiving dinner", "a holiday baking marathon", "weeknight meal prep", "pumpkin spice season",
         "the potluck", "leftover turkey", "a cookie swap", "soup season"),
        (("Thanksgiving", "E"),),
    ),
    Topic(
        "restaurants", "foodanddrink", 0.6,
        ("Fast-food chain", "Local diner", "Steakhouse", "Coffee chain", "Pizza chain", "Celebrity chef",
         "Burger joint", "Food truck", "Neighborhood bakery", "Taco shop"),
        ("adds", "brings back", "launches", "drops", "tests", "debuts", "expands", "revamps"),
        ("plant-based burger", "holiday drink menu", "all-you-can-eat deal", "breakfast menu",
         "spicy chicken sandwich", "drive-thru only service", "late-night menu", "loyalty program",
         "seasonal pie", "delivery fees"),
        ("the chicken sandwich war", "a health inspection", "a grand opening", "the Michelin guide",
         "the holiday rush", "a menu price hike", "a franchise expansion", "the brunch crowd"),
        (("Michelin", "O"),),
    ),
    Topic(
        "travel", "lifestyle", 0.7,
        ("Airline", "Cruise line", "Airport", "National park", "This small town", "Travel expert",
         "Hotel chain", "This island", "Ski resort", "This road trip"),
        ("adds new options for", "offers deals on", "unveils new route for", "tops list for",
         "warns travelers about", "announces changes to", "expands service for", "launches package for"),
        ("winter getaways", "holiday travel", "budget travelers", "fall foliage trips", "national park visits",
         "weekend escapes", "family vacations", "ski season", "carry-on bags", "international flights"),
        ("the holiday travel rush", "a flight cancellation", "the passport backlog", "a hidden beach",
         "peak travel season", "the TSA line", "a cruise ship outbreak", "a scenic train ride"),
        (("TSA", "O"),),
    ),
    Topic(
        "home", "lifestyle", 0.6,
        ("Interior designer", "This cozy cabin", "Homeowner", "Gardening expert", "This tiny house",
         "Organizing pro", "This farmhouse", "Designer", "Renovation show host", "This historic mansion"),
        ("reveals trick for", "shows off", "gets stunning makeover with", "shares ideas for",
         "proves the power of", "goes viral for"),
        ("small kitchens", "holiday decorating", "fall planters", "a cluttered garage", "a backyard patio",
         "winter houseplants", "open shelving", "a bathroom refresh", "Scandinavian style", "a reading nook"),
        ("the holiday decorating season", "a kitchen remodel", "the fall garden cleanup", "a home makeover",
         "the tiny house trend", "spring cleaning", "a viral listing", "the paint color of the year"),
    ),
    Topic(
        "movies_tv", "entertainment", 1.0,
        ("Netflix", "Disney+", "HBO", "Marvel Studios", "Hulu", "Amazon Studios", "Studio", "Showrunner",
         "Director", "Network"),
        ("teases", "announces", "renews", "cancels", "reveals first look at", "sets premiere date for",
         "drops trailer for", "confirms sequel to"),
        ("holiday rom-com", "fantasy series", "superhero sequel", "true-crime docuseries", "sitcom reboot",
         "animated musical", "period drama", "space thriller", "reality competition", "Star Wars spin-off"),
        ("the Golden Globes race", "opening weekend", "a casting shakeup", "the streaming wars",
         "the season finale", "a surprise cameo", "the box office battle", "awards season"),
        (("Netflix", "O"), ("Disney+", "O"), ("HBO", "O"), ("Marvel Studios", "O"), ("Hulu", "O"),
         ("Amazon Studios", "O"), ("Star Wars", "W"), ("Golden Globes", "E")),
    ),
    Topic(
        "music", "entertainment", 0.8,
        ("Singer", "Rapper", "Pop star", "Country star", "Rock band", "Record label", "Grammy winner", "DJ",
         "K-pop group", "Songwriter"),
        ("drops surprise", "announces tour for", "teases new", "cancels", "releases video for",
         "breaks streaming record with", "performs", "reunites for"),
        ("album", "single", "holiday song", "world tour", "acoustic set", "duet", "comeback record",
         "farewell concert"),
        ("Grammy nomination day", "the halftime show", "a sold-out tour", "the music awards",
         "a streaming record", "the festival lineup", "a viral dance challenge", "a surprise reunion"),
        (("Grammy", "E"),),
    ),
)

# Generic subcategories: drawn uniformly within the category, so they say nothing of the topic.
SUBCATEGORIES: dict[str, tuple[str, ...]] = {
    "news": ("newsus", "newslocal", "newsopinion"),
    "sports": ("sportsnews", "sportsvideo", "sportsopinion"),
    "finance": ("finance-top-stories", "finance-video", "finance-opinion"),
    "health": ("health-news", "health-video", "wellness"),
    "foodanddrink": ("food-news", "food-video", "tipsandtricks"),
    "lifestyle": ("lifestylebuzz", "lifestyle-video", "lifestyletips"),
    "entertainment": ("entertainment-news", "entertainment-video", "entertainment-buzz"),
}

PLACES = ("Chicago", "Seattle", "Houston", "Denver", "Miami", "Boston", "Phoenix", "Atlanta", "Portland",
          "San José", "Montréal", "Zürich", "São Paulo", "Kraków", "Reykjavík", "Düsseldorf")
REPORTS = ("officials say", "report says", "sources say", "according to reports", "experts say",
           "new data shows")
WHEN = ("this week", "for the first time in years", "ahead of the holidays", "after months of delays",
        "this weekend", "for the second straight year", "despite criticism")
VERDICTS = ("overhyped", "a warning sign", "not what it seems", "bigger than you think", "a turning point",
            "worth watching")

# (template, weight): most headlines are plain subject-verb-object, as in real feeds.
TITLE_TEMPLATES = (
    ("{S} {A} {O}", 5.0),
    ("{S} {A} {O} amid {E}", 1.5),
    ("{S} {A} {O} after {E}", 1.5),
    ("{S} {A} {O}, {R}", 1.5),
    ("{P}: {S} {A} {O}", 1.0),
    ("{S} {A} {O} {T}", 1.5),
    ("What {E} means for {E2}", 1.0),
    ("{N} things to know about {E}", 0.8),
    ("How {E} could reshape {E2}", 0.8),
    ("Watch: {S} {A} {O}", 0.6),
    ("Opinion: {E} is {V}", 0.6),
    ("The latest on {E}: what we know so far", 0.6),
)
ABSTRACT_TEMPLATES = (
    ("{S} {A} {O}, {R}. The news comes amid {E}.", 2.0),
    ("Here is what you need to know about {E} and {O}.", 1.5),
    ("{E} has put {O} back in the spotlight in {P}.", 1.5),
    ("The latest on {E}, with reporting from {P}.", 1.0),
    ("{S} {A} {O} {T}, a move that could shape {E}.", 1.5),
    ("", 0.6),
)

# --------------------------------------------------------------------------------------------
# Click model and world layout

TOPIC_WEIGHT = 3.0
STYLE_WEIGHT = 2.5
POPULARITY_WEIGHT = 0.5
CLICK_BIAS = -4.5
# Exposure weight exp(EXPOSURE_SKEW * z): popular articles are shown more (lognormal tail).
EXPOSURE_SKEW = 1.0

NO_IMAGE_SHARE = 0.10
PNG_SHARE = 0.09
WEBP_SHARE = 0.03
IMAGE_FORMATS = ("", "jpg", "png", "webp")  # index 0: the article has no picture
JPEG_QUALITY = 80
WEBP_QUALITY = 80

MIN_CANDIDATES = 5
MAX_CANDIDATES = 50
EMPTY_HISTORY_SHARE = 0.05
MAX_HISTORY = 120

# Share of impressions by hour of day: quiet nights, morning and evening peaks.
DIURNAL = np.array([1, 0.6, 0.4, 0.3, 0.4, 0.8, 1.8, 3.0, 3.6, 3.4, 3.0, 3.0,
                    3.2, 3.0, 2.8, 2.8, 3.0, 3.4, 3.8, 4.0, 3.8, 3.2, 2.4, 1.6])
DIURNAL = DIURNAL / DIURNAL.sum()

NEWS_FILE = "news.tsv"
# The articles published before the test window: what a news.tsv given to the nightly job at the
# end of training holds (MIND's train folder has its own news.tsv, without the dev window's articles).
NEWS_TRAIN_FILE = "news_train.tsv"
TRAIN_FILE = "behaviors_train.tsv"
TEST_FILE = "behaviors_test.tsv"
TEST_UNLABELLED_FILE = "behaviors_test_unlabelled.tsv"
TRUTH_FILE = "truth.tsv"
WORLD_FILE = "world.json"
IMAGES_DIR = "images"
WORLD_FORMAT = "recsys-sample-world/1"
# Everything generate_sample writes (and images/ holds only files): a folder holding anything
# else is not replaced, since replacing deletes the whole folder.
_WORLD_FILES = frozenset({NEWS_FILE, NEWS_TRAIN_FILE, TRAIN_FILE, TEST_FILE, TEST_UNLABELLED_FILE, TRUTH_FILE, WORLD_FILE})

# Size caps, well above MIND-large (1M users, 161k articles, 15M impressions), so that a typo
# (a few zeros too many) is one clear line rather than a MemoryError or OverflowError in NumPy.
MAX_USERS = 10_000_000
MAX_NEWS = 2_000_000
MAX_IMPRESSIONS = 50_000_000  # in each window

# Random streams: every generator is keyed by (seed, stream[, chunk or item]).
_NEWS, _USERS, _HISTORY, _TEXT, _IMAGES, _TRAIN, _TEST = range(1, 8)
_CHUNK = 1000  # impressions per random-stream chunk; fixed so output never depends on speed knobs
_IMAGE_BATCH = 250


@dataclass(frozen=True)
class TimeWindows:
    """The world's calendar, as datetime64[s]: history, then training, then test.

    Attributes:
        history_start: first publication time; histories are clicks before ``train_start``.
        train_start: start of the training behaviors window.
        test_start: end of training and start of the test window.
        test_end: end of the test window.
        freshness: how long after publication an article can be shown (timedelta64[s]).
    """

    history_start: np.datetime64
    train_start: np.datetime64
    test_start: np.datetime64
    test_end: np.datetime64
    freshness: np.timedelta64


@dataclass(frozen=True)
class World:
    """A sample world's hidden state: what the files are drawn from, kept for analysis.

    Row ``i`` of the ``news_*`` arrays is the ``i``-th line of news.tsv; row ``u`` of the user
    arrays belongs to ``user_ids[u]``.

    Attributes:
        seed: the generator seed.
        windows: the calendar.
        news_ids: (n,) str MIND news ids such as ``N12345``.
        news_topic: (n,) int16 index into ``TOPICS``.
        news_style: (n,) int16 index into ``covers.STYLE_NAMES``.
        news_popularity: (n,) float32 popularity latent ``z``.
        news_published: (n,) datetime64[s] publication times.
        news_image: (n,) int8 index into ``IMAGE_FORMATS`` (0: no picture).
        user_ids: (u,) str MIND user ids such as ``U123``.
        user_activity: (u,) float32 relative activity (impression rate).
        topic_affinity: (u, num_topics) float32, 0 for topics the user does not care about.
        style_affinity: (u, num_styles) float32, 0 for styles the user does not care about.
        history_offsets: (u + 1,) int64 offsets into ``history_items``.
        history_items: (h,) int32 news rows of each user's clicks, oldest first.
    """

    seed: int
    windows: TimeWindows
    news_ids: np.ndarray
    news_topic: np.ndarray
    news_style: np.ndarray
    news_popularity: np.ndarray
    news_published: np.ndarray
    news_image: np.ndarray
    user_ids: np.ndarray
    user_activity: np.ndarray
    topic_affinity: np.ndarray
    style_affinity: np.ndarray
    history_offsets: np.ndarray
    history_items: np.ndarray

    @property
    def num_news(self) -> int:
        return len(self.news_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def history(self, user_row: int) -> np.ndarray:
        """(h_u,) int32 news rows clicked by a user before training, oldest first."""
        return self.history_items[self.history_offsets[user_row] : self.history_offsets[user_row + 1]]


def click_logits(world: World, user_rows: np.ndarray, news_rows: np.ndarray) -> np.ndarray:
    """Logit of the independent click probability of articles shown to users.

    Args:
        world: the world.
        user_rows: int array of user rows, broadcastable against ``news_rows``.
        news_rows: int array of news rows.

    Returns:
        float64 array of the broadcast shape; ``sigmoid`` of it is the click probability
        before conditioning on "at least one click per impression".
    """
    return _logits(world.topic_affinity, world.style_affinity, world.news_topic, world.news_style,
                   world.news_popularity, user_rows, news_rows)


def _logits(topic_aff, style_aff, topic, style, popularity, user_rows, news_rows) -> np.ndarray:
    return (
        TOPIC_WEIGHT * topic_aff[user_rows, topic[news_rows]].astype(np.float64)
        + STYLE_WEIGHT * style_aff[user_rows, style[news_rows]]
        + POPULARITY_WEIGHT * popularity[news_rows]
        + CLICK_BIAS
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low
            or (high is not None and value > high)):
        raise ConfigError(f"sample world: {name} is {value!r}, expected {expected}")


def _check_world_args(num_users: int, num_news: int, seed: int, history_days: int, train_days: int,
                      test_days: int, freshness_days: int) -> None:
    _check_int("num_users", num_users, 10, MAX_USERS)
    _check_int("num_news", num_news, 100, MAX_NEWS)
    _check_int("seed", seed, 0)
    _check_int("history_days", history_days, 1)
    _check_int("train_days", train_days, 1)
    _check_int("test_days", test_days, 1)
    _check_int("freshness_days", freshness_days, 1)
    if freshness_days > history_days:
        raise ConfigError(
            f"sample world: freshness_days is {freshness_days}, expected at most history_days ({history_days})"
        )


def build_world(
    *,
    num_users: int,
    num_news: int,
    seed: int,
    start: str = "2019-10-26",
    history_days: int = 14,
    train_days: int = 5,
    test_days: int = 2,
    freshness_days: int = 2,
) -> World:
    """Draw a world's hidden state: articles, users, preferences and click histories.

    Args:
        num_users: number of users (10 to ``MAX_USERS``, 10 million).
        num_news: number of articles (100 to ``MAX_NEWS``, 2 million).
        seed: non-negative generator seed.
        start: first day of the history period, ``YYYY-MM-DD``.
        history_days: days of history before the training window.
        train_days: days in the training window.
        test_days: days in the test window, which starts where training ends.
        freshness_days: how long an article stays in the candidate pool after publication.

    Returns:
        The ``World``; the same arguments give the same world.

    Raises:
        ConfigError: if a size or window is out of range or ``start`` is not a date.
    """
    _check_world_args(num_users, num_news, seed, history_days, train_days, test_days, freshness_days)
    try:
        origin = np.datetime64(start, "D").astype("datetime64[s]")
    except ValueError as err:
        raise ConfigError(f"sample world: start is {start!r}, expected a date YYYY-MM-DD") from err
    day = np.timedelta64(86400, "s")
    windows = TimeWindows(
        history_start=origin,
        train_start=origin + history_days * day,
        test_start=origin + (history_days + train_days) * day,
        test_end=origin + (history_days + train_days + test_days) * day,
        freshness=freshness_days * day,
    )

    rng = np.random.default_rng([seed, _NEWS])
    shares = np.array([t.share for t in TOPICS])
    news_ids = np.array([f"N{k}" for k in np.sort(rng.choice(20 * num_news, num_news, replace=False) + 10_000)])
    news_topic = rng.choice(len(TOPICS), num_news, p=shares / shares.sum()).astype(np.int16)
    news_style = rng.integers(0, NUM_STYLES, num_news).astype(np.int16)
    news_popularity = rng.standard_normal(num_news).astype(np.float32)
    span = int((windows.test_end - windows.history_start) / np.timedelta64(1, "s"))
    news_published = windows.history_start + rng.integers(0, span, num_news).astype("timedelta64[s]")
    u = rng.random(num_news)
    news_image = np.select(
        [u < NO_IMAGE_SHARE, u < NO_IMAGE_SHARE + PNG_SHARE, u < NO_IMAGE_SHARE + PNG_SHARE + WEBP_SHARE],
        [0, 2, 3],
        default=1,
    ).astype(np.int8)

    rng = np.random.default_rng([seed, _USERS])
    user_ids = np.array([f"U{k}" for k in np.sort(rng.choice(20 * num_users, num_users, replace=False) + 1)])
    user_activity = rng.lognormal(0.0, 0.8, num_users).astype(np.float32)
    topic_affinity = _sparse_affinity(rng, num_users, shares, 1 + rng.binomial(3, 0.4, num_users))
    style_affinity = _sparse_affinity(rng, num_users, np.ones(NUM_STYLES), 1 + rng.binomial(2, 0.35, num_users))
    lengths = np.clip(np.round(rng.lognormal(np.log(14.0), 0.75, num_users) * user_activity**0.3), 1, MAX_HISTORY)
    lengths[rng.random(num_users) < EMPTY_HISTORY_SHARE] = 0

    offsets, items = _draw_histories(
        np.random.default_rng([seed, _HISTORY]), lengths.astype(np.int64), topic_affinity, style_affinity,
        news_topic, news_style, news_popularity, news_published, windows.train_start,
    )
    return World(
        seed=int(seed), windows=windows, news_ids=news_ids, news_topic=news_topic, news_style=news_style,
        news_popularity=news_popularity, news_published=news_published, news_image=news_image,
        user_ids=user_ids, user_activity=user_activity, topic_affinity=topic_affinity,
        style_affinity=style_affinity, history_offsets=offsets, history_items=items,
    )


def _sparse_affinity(rng: np.random.Generator, num_users: int, prior: np.ndarray, liked: np.ndarray) -> np.ndarray:
    """(num_users, k) affinities: ``liked[u]`` entries drawn without replacement by ``prior``."""
    keys = np.log(prior)[None, :] + rng.gumbel(size=(num_users, len(prior)))
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
    strength = rng.uniform(0.6, 1.0, (num_users, len(prior)))
    return np.where(rank < liked[:, None], strength, 0.0).astype(np.float32)


def _draw_histories(rng, lengths, topic_aff, style_aff, topic, style, popularity, published, before):
    """Simulate each user's clicks on articles published before ``before``, oldest first.

    Articles are shown by exposure weight and clicked with the world's click probability until
    the user has ``lengths[u]`` distinct clicks (fewer when the pool is too small).
    """
    pool = np.flatnonzero(published < before)
    num_users = len(lengths)
    lengths = np.minimum(lengths, len(pool) // 2)
    cum = np.cumsum(np.exp(EXPOSURE_SKEW * popularity[pool].astype(np.float64)))
    clicked: list[dict[int, None]] = [{} for _ in range(num_users)]
    todo = np.flatnonzero(lengths > 0)
    draws_per_round = 128
    for _ in range(1000):  # rounds; each adds ~draws * CTR clicks per user still short
        if len(todo) == 0:
            break
        for lo in range(0, len(todo), 4096):
            users = todo[lo : lo + 4096]
            u = rng.random((len(users), draws_per_round)) * cum[-1]
            shown = pool[np.minimum(np.searchsorted(cum, u), len(pool) - 1)]
            p = _sigmoid(_logits(topic_aff, style_aff, topic, style, popularity, users[:, None], shown))
            hits = rng.random(p.shape) < p
            for row, u in enumerate(users):
                got = clicked[u]
                for item in shown[row, hits[row]].tolist():
                    if len(got) >= lengths[u]:
                        break
                    got.setdefault(item, None)
        todo = np.array([u for u in todo if len(clicked[u]) < lengths[u]], dtype=np.int64)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(c) for c in clicked])
    items = np.zeros(offsets[-1], dtype=np.int32)
    for u, got in enumerate(clicked):
        rows = np.fromiter(got, dtype=np.int32, count=len(got))
        items[offsets[u] : offsets[u + 1]] = rows[np.argsort(published[rows], kind="stable")]
    return offsets, items


# --------------------------------------------------------------------------------------------
# Text


def format_mind_time(t: np.datetime64 | datetime) -> str:
    """MIND's time format, ``%m/%d/%Y %I:%M:%S %p`` without leading zeros on month, day, hour.

    >>> format_mind_time(np.datetime64("2019-11-11T09:05:58"))
    '11/11/2019 9:05:58 AM'
    """
    if isinstance(t, np.datetime64):
        t = datetime(1970, 1, 1) + timedelta(seconds=int(t.astype("datetime64[s]").astype(np.int64)))
    hour = t.hour % 12 or 12
    return f"{t.month}/{t.day}/{t.year} {hour}:{t.minute:02d}:{t.second:02d} {'AM' if t.hour < 12 else 'PM'}"


def _pick(options: tuple, u: float):
    """The option at uniform draw ``u`` in [0, 1)."""
    return options[int(u * len(options))]


def _template_picker(templates: tuple[tuple[str, float], ...]) -> Callable[[float], str]:
    cum = np.cumsum([w for _, w in templates])
    bounds = (cum / cum[-1]).tolist()

    def pick(u: float) -> str:
        return templates[min(int(np.searchsorted(bounds, u, side="right")), len(templates) - 1)][0]

    return pick


_TITLE = _template_picker(TITLE_TEMPLATES)
_ABSTRACT = _template_picker(ABSTRACT_TEMPLATES)
_DRAWS_PER_TEXT = 11


def _fill(template: str, topic: Topic, u: list[float]) -> str:
    """Fill a template's slots from the topic and generic vocabularies with draws ``u``."""
    first = int(u[3] * len(topic.events))
    second = int(u[4] * (len(topic.events) - 1))
    second += second >= first
    text = template.format(
        S=_pick(topic.subjects, u[0]), A=_pick(topic.actions, u[1]), O=_pick(topic.objects, u[2]),
        E=topic.events[first], E2=topic.events[second], P=_pick(PLACES, u[5]), R=_pick(REPORTS, u[6]),
        T=_pick(WHEN, u[7]), N=3 + int(u[8] * 10), V=_pick(VERDICTS, u[9]),
    )
    # Headline case: capital first letter, and after a colon or a full stop.
    text = ": ".join(p[:1].upper() + p[1:] for p in text.split(": "))
    return ". ".join(p[:1].upper() + p[1:] for p in text.split(". "))


def _wikidata_id(label: str) -> str:
    return f"Q{zlib.crc32(label.encode('utf-8')) % 90_000_000 + 1000}"


def _entities_json(text: str, topic: Topic) -> str:
    """MIND-style entity list for the named entities found in ``text``."""
    found = []
    for surface, kind in topic.entities + tuple((p, "G") for p in PLACES):
        offsets = []
        at = text.find(surface)
        while at >= 0:
            offsets.append(at)
            at = text.find(surface, at + len(surface))
        if offsets:
            crc = zlib.crc32(surface.encode("utf-8"))
            found.append({
                "Label": surface, "Type": kind, "WikidataId": _wikidata_id(surface),
                "Confidence": round(0.85 + (crc % 150) / 1000, 3), "OccurrenceOffsets": offsets,
                "SurfaceForms": [surface],
            })
    return json.dumps(found, ensure_ascii=False)


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    words = "".join(c if c.isalnum() else " " for c in ascii_text).split()
    return "-".join(words[:8])


def _write_news(world: World, path: Path, train_path: Path) -> None:
    """news.tsv (every article) and news_train.tsv (those published before the test window)."""
    draws = np.random.default_rng([world.seed, _TEXT]).random((world.num_news, 2 * _DRAWS_PER_TEXT + 1)).tolist()
    lines = []
    for row, u in enumerate(draws):
        topic = TOPICS[world.news_topic[row]]
        title = _fill(_TITLE(u[10]), topic, u[:10])
        abstract = _fill(_ABSTRACT(u[21]), topic, u[11:21])
        subcategory = _pick(SUBCATEGORIES[topic.category], u[22])
        news_id = str(world.news_ids[row])
        url = f"https://news.example.com/{topic.category}/{_slug(title)}-{news_id.lower()}"
        lines.append("\t".join((news_id, topic.category, subcategory, title, abstract, url,
                                _entities_json(title, topic), _entities_json(abstract, topic))) + "\n")
    path.write_text("".join(lines), encoding="utf-8")
    published = world.news_published < world.windows.test_start
    train_path.write_text("".join(line for line, keep in zip(lines, published) if keep), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Cover images


def _draw_covers(images_dir: str, seed: int, size: int, items: list[tuple[int, str, int, int]]) -> int:
    """Draw and save covers; items are (news row, news id, style, image format index).

    Returns:
        The number of covers written.
    """
    for row, news_id, style, fmt in items:
        image = draw_cover(style, np.random.default_rng([seed, _IMAGES, row]), size)
        path = os.path.join(images_dir, f"{news_id}.{IMAGE_FORMATS[fmt]}")
        if fmt == 1:
            image.save(path, "JPEG", quality=JPEG_QUALITY)
        elif fmt == 2:
            image.save(path, "PNG")
        else:
            image.save(path, "WEBP", quality=WEBP_QUALITY)
    return len(items)


# --------------------------------------------------------------------------------------------
# Behaviors


class _Pool:
    """Articles sorted by publication time with cumulative exposure weights."""

    def __init__(self, world: World):
        self.rows = np.argsort(world.news_published, kind="stable").astype(np.int32)
        self.published = world.news_published[self.rows].astype(np.int64)
        self.log_weight = EXPOSURE_SKEW * world.news_popularity[self.rows].astype(np.float64)
        self.cum = np.concatenate([[0.0], np.cumsum(np.exp(self.log_weight))])
        self.freshness = int(world.windows.freshness / np.timedelta64(1, "s"))

    def candidates(self, rng: np.random.Generator, times: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct articles for each impression, drawn by exposure weight without replacement.

        Args:
            rng: the chunk's generator.
            times: (m,) int64 impression times in seconds.
            sizes: (m,) int64 wanted candidate counts (at most ``MAX_CANDIDATES``).

        Returns:
            (m, MAX_CANDIDATES) int32 news rows, valid in the first ``counts[i]`` columns of row
            ``i``, in random order; and (m,) int64 ``counts`` (smaller than ``sizes`` only when
            fewer articles are in the freshness window).
        """
        num = len(self.rows)
        hi = np.searchsorted(self.published, times, side="right")
        lo = np.searchsorted(self.published, times - self.freshness, side="left")
        # A thin window borrows older articles (and, in a degenerate world whose first articles
        # are not out yet, the first ones to come out) so that every impression has candidates.
        hi = np.maximum(hi, min(MIN_CANDIDATES, num))
        lo = np.minimum(lo, np.maximum(0, hi - MIN_CANDIDATES))
        counts = np.minimum(sizes, hi - lo)
        chosen = np.zeros((len(times), MAX_CANDIDATES), dtype=np.int64)
        small = (hi - lo) <= 4 * MAX_CANDIDATES
        if small.any():
            chosen[small] = self._gumbel_top(rng, lo[small], hi[small], counts[small])
        if (~small).any():
            chosen[~small] = self._successive(rng, lo[~small], hi[~small], counts[~small])
        # Order within an impression carries no signal: shuffle the valid prefix of each row.
        cols = np.arange(MAX_CANDIDATES)
        keys = np.where(cols[None, :] < counts[:, None], rng.random(chosen.shape), np.inf)
        chosen = np.take_along_axis(chosen, np.argsort(keys, axis=1), axis=1)
        return self.rows[chosen], counts

    def _gumbel_top(self, rng, lo, hi, counts) -> np.ndarray:
        """Weighted sampling without replacement (Gumbel top-k) over padded small pools."""
        width = int((hi - lo).max())
        index = lo[:, None] + np.arange(width)[None, :]
        valid = index < hi[:, None]
        weights = self.log_weight[np.minimum(index, len(self.rows) - 1)]
        keys = np.where(valid, weights + rng.gumbel(size=index.shape), -np.inf)
        top = np.argsort(-keys, axis=1)[:, :MAX_CANDIDATES]
        picked = np.take_along_axis(index, top, axis=1)
        if picked.shape[1] < MAX_CANDIDATES:
            picked = np.pad(picked, ((0, 0), (0, MAX_CANDIDATES - picked.shape[1])))
        return np.where(np.arange(MAX_CANDIDATES)[None, :] < counts[:, None], picked, 0)

    def _successive(self, rng, lo, hi, counts) -> np.ndarray:
        """Weighted sampling without replacement in large pools: draw with replacement, keep
        the first distinct draws (successive sampling); rows left short draw again."""
        out = np.zeros((len(lo), MAX_CANDIDATES), dtype=np.int64)
        todo = np.arange(len(lo))
        have = np.zeros(len(lo), dtype=np.int64)
        draws = 3 * MAX_CANDIDATES
        while len(todo):
            base, span = self.cum[lo[todo]], self.cum[hi[todo]] - self.cum[lo[todo]]
            u = base[:, None] + rng.random((len(todo), draws)) * span[:, None]
            idx = np.clip(np.searchsorted(self.cum, u, side="right") - 1, lo[todo, None], hi[todo, None] - 1)
            # Earlier draws (kept from the previous round) come first.
            idx = np.concatenate([out[todo], idx], axis=1)
            stale = np.arange(MAX_CANDIDATES)[None, :] >= have[todo, None]
            idx[:, :MAX_CANDIDATES][stale] = -1
            order = np.argsort(idx, axis=1, kind="stable")
            ranked = np.take_along_axis(idx, order, axis=1)
            new = np.concatenate([np.ones((len(todo), 1), bool), ranked[:, 1:] != ranked[:, :-1]], axis=1)
            first = new & (ranked >= 0)
            positions = np.sort(np.where(first, order, idx.shape[1]), axis=1)[:, :MAX_CANDIDATES]
            found = first.sum(axis=1)
            out[todo] = np.take_along_axis(idx, np.minimum(positions, idx.shape[1] - 1), axis=1)
            have[todo] = np.minimum(found, counts[todo])
            todo = todo[found < counts[todo]]
        return np.where(np.arange(MAX_CANDIDATES)[None, :] < counts[:, None], out, 0)


def _draw_labels(rng: np.random.Generator, p: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels from independent clicks conditioned on at least one click per impression.

    Args:
        rng: the chunk's generator.
        p: (c,) independent click probabilities of ``len(counts)`` impressions, concatenated.
        counts: (m,) candidates per impression.

    Returns:
        (labels (c,) int8, conditional click probabilities (c,) float64).
    """
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    segment = np.repeat(np.arange(len(counts)), counts)
    position = np.arange(len(p)) - starts[segment]
    log_miss = np.log1p(-p)
    missed_before = np.cumsum(log_miss) - log_miss
    missed_before -= missed_before[starts][segment]
    # P(first click at j) = p_j * prod_{i<j} (1 - p_i); per impression they sum to
    # P(at least one click), which the conditional probability divides by.
    first = p * np.exp(missed_before)
    any_click = np.add.reduceat(first, starts)
    running = np.cumsum(first)
    running -= (running[starts] - first[starts])[segment]
    target = rng.random(len(counts)) * any_click
    j = np.minimum(np.add.reduceat((running <= target[segment]).astype(np.int64), starts), counts - 1)
    after = rng.random(len(p)) < p
    labels = np.where(position < j[segment], 0, np.where(position == j[segment], 1, after)).astype(np.int8)
    return labels, p / any_click[segment]


def _schedule(world: World, rng: np.random.Generator, num: int, start: np.datetime64, end: np.datetime64):
    """Impression times (sorted, int64 seconds) and user rows for one window."""
    days = int((end - start) / np.timedelta64(86400, "s"))
    seconds = (rng.integers(0, days, num) * 86400 + rng.choice(24, num, p=DIURNAL) * 3600
               + rng.integers(0, 3600, num))
    times = start.astype(np.int64) + np.sort(seconds)
    users = rng.choice(world.num_users, num, p=world.user_activity / world.user_activity.sum())
    return times, users


def _write_behaviors(world: World, pool: _Pool, split: str, num: int, files: dict, histories: list[str],
                     progress: Callable[[int], None] | None, poll: Callable[[], None]) -> dict:
    """Stream one window's impressions to its files, a chunk at a time; returns its counts."""
    stream = _TRAIN if split == "train" else _TEST
    start, end = ((world.windows.train_start, world.windows.test_start) if split == "train"
                  else (world.windows.test_start, world.windows.test_end))
    times, users = _schedule(world, np.random.default_rng([world.seed, stream]), num, start, end)
    test_start = world.windows.test_start.astype(np.int64)
    counts = {"items": 0, "clicks": 0, "fresh_items": 0}
    for chunk, lo in enumerate(range(0, num, _CHUNK)):
        rng = np.random.default_rng([world.seed, stream, chunk])
        chunk_times, chunk_users = times[lo : lo + _CHUNK], users[lo : lo + _CHUNK]
        m = len(chunk_times)
        sizes = MIN_CANDIDATES + np.round((MAX_CANDIDATES - MIN_CANDIDATES) * rng.beta(5.0, 2.0, m)).astype(np.int64)
        chosen, sizes = pool.candidates(rng, chunk_times, sizes)
        rows = chosen[np.arange(MAX_CANDIDATES)[None, :] < sizes[:, None]]
        user_of_item = np.repeat(chunk_users, sizes)
        p = _sigmoid(click_logits(world, user_of_item, rows))
        labels, conditional = _draw_labels(rng, p, sizes)

        ids = world.news_ids[rows].tolist()
        ys = labels.tolist()
        ends = np.cumsum(sizes).tolist()
        impression_ids = range(lo + 1, lo + m + 1)
        labelled, bare = [], []
        for k, (impression_id, user, t, end_) in enumerate(zip(impression_ids, chunk_users.tolist(),
                                                                  chunk_times.tolist(), ends)):
            begin = end_ - int(sizes[k])
            head = (f"{impression_id}\t{world.user_ids[user]}\t{format_mind_time(np.datetime64(t, 's'))}\t"
                    f"{histories[user]}\t")
            labelled.append(head + " ".join(f"{nid}-{y}" for nid, y in zip(ids[begin:end_], ys[begin:end_])) + "\n")
            if "bare" in files:
                bare.append(head + " ".join(ids[begin:end_]) + "\n")
        # int64 even for a one-impression chunk, whose empty ends[:-1] would make the starts float.
        starts = np.array([0] + ends[:-1], dtype=np.int64)
        positions = (np.arange(len(rows)) - np.repeat(starts, sizes)).tolist()
        item_impressions = np.repeat(np.arange(lo + 1, lo + m + 1), sizes).tolist()
        shown = np.clip(conditional, 1e-6, 1 - 1e-6).tolist()
        files["truth"].write("".join(
            f"{split}\t{i}\t{nid}\t{pos}\t{q:.6f}\t{y}\n"
            for i, nid, pos, q, y in zip(item_impressions, ids, positions, shown, ys)
        ))
        files["labelled"].write("".join(labelled))
        if "bare" in files:
            files["bare"].write("".join(bare))
        counts["items"] += len(rows)
        counts["clicks"] += int(labels.sum())
        counts["fresh_items"] += int((world.news_published[rows].astype(np.int64) >= test_start).sum())
        if progress is not None:
            progress(m)
        poll()
    return counts


# --------------------------------------------------------------------------------------------
# The whole sample


def default_test_impressions(num_impressions: int) -> int:
    """The test window's impressions when not given: a third of the training ones, at least 1."""
    return max(1, (int(num_impressions) + 1) // 3)  # round(n / 3) in integers: no float overflow for huge n


def generate_sample(
    out_dir: str | os.PathLike,
    *,
    num_users: int = 1000,
    num_news: int = 1000,
    num_impressions: int = 1800,
    seed: int = 7,
    num_test_impressions: int | None = None,
    image_size: int = 96,
    start: str = "2019-10-26",
    history_days: int = 14,
    train_days: int = 5,
    test_days: int = 2,
    freshness_days: int = 2,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Generate a MIND-format sample world into ``out_dir``.

    Writes ``news.tsv`` (every article), ``news_train.tsv`` (those published before the test
    window), ``behaviors_train.tsv``, ``behaviors_test.tsv`` (labelled),
    ``behaviors_test_unlabelled.tsv`` (bare candidate ids, as MIND test files come),
    ``truth.tsv`` (true click probability of every shown item), ``world.json`` and
    ``images/<NewsID>.<jpg|png|webp>``. The world is built in a hidden sibling folder and
    renamed into place at the end, so ``out_dir`` is either the old world or the new one.

    Args:
        out_dir: output folder; it must not exist, be empty, or be exactly an earlier sample
            world (its files and nothing else), which is replaced as a whole.
        num_users: number of users (10 to ``MAX_USERS``, 10 million).
        num_news: number of articles (100 to ``MAX_NEWS``, 2 million).
        num_impressions: impressions in the training window (1 to ``MAX_IMPRESSIONS``, 50 million).
        seed: non-negative seed; the same arguments give the same bytes.
        num_test_impressions: impressions in the test window; None means a third of
            ``num_impressions`` (at least 1); at most ``MAX_IMPRESSIONS`` too.
        image_size: side of the square cover pictures in pixels (32 to 512).
        start: first day of the history period, ``YYYY-MM-DD``.
        history_days: days of click history before training.
        train_days: days of training behaviors.
        test_days: days of test behaviors, right after training.
        freshness_days: how long an article can be shown after publication.
        workers: processes drawing cover pictures (1 draws them in this process); does not
            change the output.
        progress: called with the number of work units just finished; units are articles
            (covers) and impressions of both windows, ``num_news + num_impressions +
            num_test_impressions`` in all.

    Returns:
        Summary: ``out_dir``, ``seed``, counts (``news``, ``news_with_image``, ``users``,
        ``users_with_history``, ``train_impressions``, ``test_impressions``, ``train_items``,
        ``test_items``, ``train_clicks``, ``test_clicks``), ``fresh_test_share`` (share of test
        items published after training), ``bytes`` on disk and ``seconds`` taken.

    Raises:
        ConfigError: if an argument is out of range.
        SampleError: if ``out_dir`` holds anything but an earlier sample world, or is the
            current folder or one above it.
        DiskError: if the disk is full or read-only (nothing is left of the new world).
    """
    began = time.perf_counter()
    if num_test_impressions is None and not isinstance(num_impressions, bool) and isinstance(num_impressions, numbers.Integral):
        num_test_impressions = default_test_impressions(num_impressions)
    _check_int("num_impressions", num_impressions, 1, MAX_IMPRESSIONS)
    _check_int("num_test_impressions", num_test_impressions, 1, MAX_IMPRESSIONS)
    _check_int("image_size", image_size, 32, 512)
    _check_int("workers", workers, 1)
    out = Path(out_dir)
    _check_out_dir(out)
    world = build_world(num_users=num_users, num_news=num_news, seed=seed, start=start,
                        history_days=history_days, train_days=train_days, test_days=test_days,
                        freshness_days=freshness_days)
    num_train, num_test = int(num_impressions), int(num_test_impressions)

    with disk_errors("write the sample world", out):  # covers, behaviors: files of the staging folder
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            staging.chmod(umasked(0o777))  # mkdtemp makes it private; the world is an ordinary folder
            (staging / IMAGES_DIR).mkdir()
            _write_news(world, staging / NEWS_FILE, staging / NEWS_TRAIN_FILE)
            covers = [(row, str(world.news_ids[row]), int(world.news_style[row]), int(world.news_image[row]))
                      for row in range(world.num_news) if world.news_image[row] > 0]
            if progress is not None and len(covers) < world.num_news:
                progress(world.num_news - len(covers))
            batches = [covers[i : i + _IMAGE_BATCH] for i in range(0, len(covers), _IMAGE_BATCH)]
            images_dir = str(staging / IMAGES_DIR)
            counts = _write_world_files(world, staging, images_dir, batches, num_train, num_test, image_size,
                                        workers, progress)
            total_bytes = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
            summary = {
                "news": world.num_news,
                "news_with_image": len(covers),
                "users": world.num_users,
                "users_with_history": int((np.diff(world.history_offsets) > 0).sum()),
                "history_clicks": int(world.history_offsets[-1]),
                **counts,
            }
            _write_world_json(staging / WORLD_FILE, world, summary, num_impressions=num_train,
                              num_test_impressions=num_test, image_size=image_size, start=start,
                              history_days=history_days, train_days=train_days, test_days=test_days,
                              freshness_days=freshness_days)
            _swap_in(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return {"out_dir": str(out), "seed": int(seed), **summary, "bytes": total_bytes,
            "seconds": round(time.perf_counter() - began, 3)}


def _write_world_files(world, staging, images_dir, batches, num_train, num_test, image_size, workers, progress):
    """Draw covers (in a process pool when ``workers > 1``) while streaming the behaviors."""
    pending: list[Future] = []
    executor = None
    if workers > 1 and batches:
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        pending = [executor.submit(_draw_covers, images_dir, world.seed, image_size, b) for b in batches]

    def poll() -> None:
        for future in [f for f in pending if f.done()]:
            pending.remove(future)
            done = future.result()
            if progress is not None:
                progress(done)

    try:
        if executor is None:
            for batch in batches:
                done = _draw_covers(images_dir, world.seed, image_size, batch)
                if progress is not None:
                    progress(done)
        pool = _Pool(world)
        histories = [" ".join(world.news_ids[world.history(u)].tolist()) for u in range(world.num_users)]
        with open(staging / TRAIN_FILE, "w", encoding="utf-8", newline="\n") as train, \
                open(staging / TEST_FILE, "w", encoding="utf-8", newline="\n") as test, \
                open(staging / TEST_UNLABELLED_FILE, "w", encoding="utf-8", newline="\n") as bare, \
                open(staging / TRUTH_FILE, "w", encoding="utf-8", newline="\n") as truth:
            train_counts = _write_behaviors(world, pool, "train", num_train, {"labelled": train, "truth": truth},
                                            histories, progress, poll)
            test_counts = _write_behaviors(world, pool, "test", num_test,
                                           {"labelled": test, "bare": bare, "truth": truth},
                                           histories, progress, poll)
        while pending:
            pending[0].result()
            poll()
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return {
        "train_impressions": num_train,
        "test_impressions": num_test,
        "train_items": train_counts["items"],
        "test_items": test_counts["items"],
        "train_clicks": train_counts["clicks"],
        "test_clicks": test_counts["clicks"],
        "fresh_test_share": round(test_counts["fresh_items"] / test_counts["items"], 4),
    }


def _check_out_dir(out: Path) -> None:
    """Refuses an ``out`` the world cannot be renamed onto, and one holding anything but an
    earlier sample world: replacing a folder deletes all of it, so a user's own file must stop it."""
    here = Path.cwd().resolve()
    if out.name in ("", "..") or out.resolve() == here or out.resolve() in here.parents:
        raise SampleError(f"{out}: is the current folder or one above it, which the new world cannot be renamed "
                          "onto; choose an empty or new folder of its own")
    if out.exists() and not out.is_dir():
        raise SampleError(f"{out}: exists and is not a folder, expected a folder for the sample world")
    if not out.is_dir() or not any(out.iterdir()):
        return
    refuse = "so it is not an earlier sample world to replace; choose an empty or new folder"
    for entry in sorted(out.iterdir()):
        if entry.name == IMAGES_DIR and entry.is_dir() and not entry.is_symlink():
            odd = next((p for p in sorted(entry.iterdir()) if not _is_plain_file(p)), None)
        else:
            odd = None if entry.name in _WORLD_FILES and _is_plain_file(entry) else entry
        if odd is not None:
            raise SampleError(f"{out}: holds {odd.relative_to(out)}, which generate-sample does not write, {refuse}")
    world = out / WORLD_FILE
    if not world.exists():
        raise SampleError(f"{out}: holds no {WORLD_FILE}, {refuse}")
    try:
        document = json.loads(world.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError(f"{world}: cannot be read ({err}), {refuse}") from None
    found = document.get("format") if isinstance(document, dict) else type(document).__name__
    if found != WORLD_FORMAT:
        raise SampleError(f"{world}: field 'format' has {found!r}, expected {WORLD_FORMAT!r}, {refuse}")


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` with renames, so readers see one world or the other."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old / out.name)
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old / out.name, out)  # the earlier world back: out is never left missing
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _iso(t: np.datetime64) -> str:
    return str(t.astype("datetime64[s]"))


def _write_world_json(path: Path, world: World, counts: dict, **parameters) -> None:
    document = {
        "format": WORLD_FORMAT,
        "seed": world.seed,
        "parameters": {"num_users": world.num_users, "num_news": world.num_news, **parameters},
        "windows": {
            "history_start": _iso(world.windows.history_start),
            "train_start": _iso(world.windows.train_start),
            "test_start": _iso(world.windows.test_start),
            "test_end": _iso(world.windows.test_end),
            "freshness_hours": int(world.windows.freshness / np.timedelta64(3600, "s")),
        },
        "counts": counts,
        "click_model": {
            "topic_weight": TOPIC_WEIGHT,
            "style_weight": STYLE_WEIGHT,
            "popularity_weight": POPULARITY_WEIGHT,
            "bias": CLICK_BIAS,
            "exposure_skew": EXPOSURE_SKEW,
            "num_topics": len(TOPICS),
            "num_styles": NUM_STYLES,
            "styles": list(STYLE_NAMES),
        },
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def read_world(out_dir: str | os.PathLike) -> World:
    """Rebuild the hidden ``World`` of a generated sample from its ``world.json``.

    Args:
        out_dir: a folder written by ``generate_sample``.

    Returns:
        The same ``World`` the files were drawn from.

    Raises:
        SampleError: if ``world.json`` is missing, unreadable or of another format.
    """
    path = Path(out_dir) / WORLD_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise SampleError(f"{path}: not found, expected the world.json of a generated sample") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError(f"{path}: cannot be read ({err}), expected JSON written by generate_sample") from err
    if not isinstance(document, dict) or document.get("format") != WORLD_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise SampleError(f"{path}: field 'format' has {found!r}, expected {WORLD_FORMAT!r}")
    try:
        params = document["parameters"]
        return build_world(
            num_users=params["num_users"], num_news=params["num_news"], seed=document["seed"],
            start=params["start"], history_days=params["history_days"], train_days=params["train_days"],
            test_days=params["test_days"], freshness_days=params["freshness_days"],
        )
    except (KeyError, TypeError) as err:
        raise SampleError(f"{path}: missing or malformed parameter {err}, expected generate_sample's parameters") from err
