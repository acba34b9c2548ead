"""Deterministic demo catalogue: product rows with ids, titles, categories and descriptions."""

from __future__ import annotations

import random
from collections.abc import Iterator

import sqlalchemy as sa

from jobs.core.errors import BadRequest
from jobs.core.settings import Settings
from jobs.store import db

DEMO_TABLE = "products"
DEMO_TARGET = "product_embeddings"
DEMO_ROWS = 6000
# Enough for a scale test: 300,000 rows took 3-4 s and 72 MB of SQLite here, so this is about 2 minutes and 2.4 GB.
# Rows are generated and inserted a chunk at a time, which keeps the seeding process's memory flat (78 MB peak).
DEMO_MAX_ROWS = 10_000_000
SEED_CHUNK_ROWS = 10_000

CATALOGUE = {
    "Footwear": (["running shoe", "hiking boot", "sandal", "sneaker", "loafer", "rain boot", "trail runner"],
                 ["mesh", "full-grain leather", "suede", "recycled rubber", "waterproof nylon"],
                 ["cushioned midsole", "grippy lugged outsole", "breathable lining", "removable insole",
                  "reinforced toe cap", "quick-lace system"],
                 ["daily runs", "mountain trails", "city walks", "the beach", "long shifts on your feet"]),
    "Kitchen": (["chef's knife", "cast iron skillet", "espresso machine", "blender", "dutch oven",
                 "cutting board", "kettle"],
                ["stainless steel", "enamelled cast iron", "bamboo", "tempered glass", "carbon steel"],
                ["ergonomic handle", "even heat distribution", "dishwasher-safe parts",
                 "15-bar pressure pump", "non-slip base", "temperature control"],
                ["weeknight dinners", "slow braises", "morning coffee", "meal prep", "baking bread"]),
    "Electronics": (["wireless headphones", "bluetooth speaker", "mechanical keyboard", "4K monitor",
                     "portable charger", "smartwatch", "webcam"],
                    ["aluminium", "matte plastic", "tempered glass", "woven fabric"],
                    ["active noise cancellation", "30-hour battery", "USB-C fast charging",
                     "hot-swappable switches", "HDR support", "heart-rate sensor", "auto focus"],
                    ["commuting", "video calls", "gaming", "working from home", "travel"]),
    "Outdoor": (["tent", "sleeping bag", "backpack", "camping stove", "headlamp", "trekking poles",
                 "water filter"],
                ["ripstop nylon", "down fill", "titanium", "carbon fibre", "polyester"],
                ["two-minute setup", "rated to -10°C", "adjustable torso length", "wind-resistant burner",
                 "red night mode", "hollow-fibre membrane"],
                ["backcountry trips", "festival weekends", "alpine climbs", "family camping"]),
    "Home": (["sofa", "desk lamp", "area rug", "bookshelf", "duvet", "air purifier", "office chair"],
             ["solid oak", "linen", "wool", "walnut veneer", "organic cotton", "powder-coated steel"],
             ["adjustable height", "dimmable warm light", "HEPA filter", "lumbar support",
              "stain-resistant finish", "hypoallergenic fill"],
             ["small apartments", "home offices", "reading nooks", "allergy sufferers", "guest rooms"]),
    "Beauty": (["face serum", "shampoo", "sunscreen", "moisturiser", "lip balm", "hair dryer"],
               ["vitamin C", "hyaluronic acid", "argan oil", "shea butter", "ceramides"],
               ["fragrance-free formula", "SPF 50 protection", "ionic technology", "refillable bottle",
                "dermatologist tested", "vegan ingredients"],
               ["sensitive skin", "dry hair", "daily routines", "sunny holidays"]),
    "Toys": (["building blocks", "puzzle", "plush bear", "remote-control car", "board game", "train set"],
             ["sustainably sourced wood", "BPA-free plastic", "soft fleece", "cardboard"],
             ["1000 pieces", "rechargeable battery", "ages 3 and up", "cooperative play",
              "magnetic couplings", "machine-washable"],
             ["rainy afternoons", "family game night", "birthday gifts", "early learning"]),
    "Books": (["cookbook", "thriller novel", "field guide", "children's picture book", "biography",
               "science primer"],
              ["hardcover", "paperback", "illustrated edition", "large print"],
              ["over 120 recipes", "a twist in every chapter", "full-colour photographs",
               "rhyming text", "archival letters", "clear diagrams"],
              ["curious readers", "holiday reading", "bedtime stories", "students"]),
}
BRANDS = ["Northwind", "Contoso", "Fabrikam", "Tailspin", "Litware", "Adatum", "Proseware",
          "Woodgrove", "Lucerne", "Wingtip"]
ADJECTIVES = ["lightweight", "durable", "compact", "premium", "versatile", "classic", "eco-friendly",
              "ultra-quiet", "heavy-duty", "minimalist"]
COLOURS = ["black", "slate grey", "forest green", "navy", "sand", "crimson", "white", "teal"]


def product(rng: random.Random, row_id: int) -> dict:
    """One product row; the same id always gives the same product."""
    category = rng.choice(sorted(CATALOGUE))
    nouns, materials, features, uses = CATALOGUE[category]
    noun, material, brand = rng.choice(nouns), rng.choice(materials), rng.choice(BRANDS)
    adjective, colour = rng.choice(ADJECTIVES), rng.choice(COLOURS)
    picked = rng.sample(features, k=rng.randint(1, min(4, len(features))))
    title = f"{brand} {adjective.title()} {noun.title()}"
    sentences = [f"A {adjective} {noun} made from {material}, in {colour}."]
    sentences.append("It features " + ", ".join(picked[:-1]) + (" and " if len(picked) > 1 else "")
                     + picked[-1] + ".")
    if rng.random() < 0.7:
        sentences.append(f"Designed for {rng.choice(uses)}.")
    if rng.random() < 0.4:
        sentences.append(f"{brand} backs it with a {rng.choice([1, 2, 3, 5])}-year warranty.")
    if rng.random() < 0.25:
        sentences.append(f"Customers say it is ideal for {rng.choice(uses)} and easy to care for.")
    return {"id": row_id, "title": title, "category": category,
            "price": round(rng.uniform(5, 900), 2), "description": " ".join(sentences)}


def product_chunks(n: int, seed: int = 7, chunk: int = SEED_CHUNK_ROWS) -> Iterator[list[dict]]:
    """The n deterministic product rows with ids 1..n, `chunk` rows at a time."""
    rng = random.Random(seed)
    for start in range(1, n + 1, chunk):
        yield [product(rng, i) for i in range(start, min(n, start + chunk - 1) + 1)]


def products(n: int = DEMO_ROWS, seed: int = 7) -> list[dict]:
    """n deterministic product rows with ids 1..n."""
    return [row for part in product_chunks(n, seed) for row in part]


def seed_demo(url: str | None = None, n: int = DEMO_ROWS, table: str = DEMO_TABLE) -> int:
    """Create and fill the demo source table if it is missing; returns its row count. BadRequest for a count
    out of 1..DEMO_MAX_ROWS, before anything is created."""
    if not 1 <= n <= DEMO_MAX_ROWS:
        raise BadRequest(f"demo rows must be between 1 and {DEMO_MAX_ROWS}, not {n}")
    engine = db.check_connection(url or Settings().db_url, create=True)
    meta = sa.MetaData()
    products_table = sa.Table(
        table, meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("category", sa.String(60), nullable=False),
        sa.Column("price", sa.Float, nullable=False),
        sa.Column("description", sa.Text),
    )
    db.create_missing(engine, meta)
    counted = sa.select(sa.func.count()).select_from(products_table)
    try:
        with engine.begin() as conn:
            count = conn.execute(counted).scalar_one()
            if count == 0:  # one transaction: an interrupted seed leaves the table empty, and the next one fills it
                for part in product_chunks(n):
                    conn.execute(products_table.insert(), part)
                count = n
    except sa.exc.IntegrityError:
        # Another seed (two `make run` at once) filled the table between this one's count and its insert.
        with engine.connect() as conn:
            count = conn.execute(counted).scalar_one()
        if count == 0:
            raise
    return int(count)
