"""Column names, defined once and shared by the reader, the store and the models."""

NEWS_ID = "news_id"
USER_ID = "user_id"
IMPRESSION_ID = "impression_id"
CATEGORY = "category"
SUBCATEGORY = "subcategory"
TITLE = "title"
ABSTRACT = "abstract"
URL = "url"
TITLE_ENTITIES = "title_entities"
ABSTRACT_ENTITIES = "abstract_entities"
IMAGE_PATH = "image_path"
IMAGE_STATUS = "image_status"
CONTENT_HASH = "content_hash"
FIRST_SEEN_AT = "first_seen_at"
TIME = "time"
HISTORY = "history"
LABEL = "label"
SCORE = "score"
RANK = "rank"
RUN_ID = "run_id"
IMPRESSIONS = "impressions"  # the fifth behaviors column (never stored as such)

# The MIND files carry no header; these are their columns in file order.
NEWS_TSV_COLUMNS = (NEWS_ID, CATEGORY, SUBCATEGORY, TITLE, ABSTRACT, URL, TITLE_ENTITIES, ABSTRACT_ENTITIES)
BEHAVIORS_TSV_COLUMNS = (IMPRESSION_ID, USER_ID, TIME, HISTORY, IMPRESSIONS)
# The news frame the store and the scoring catalogue hand around, one row per article.
NEWS_FRAME_COLUMNS = (NEWS_ID, CATEGORY, SUBCATEGORY, TITLE, ABSTRACT, IMAGE_PATH, IMAGE_STATUS, CONTENT_HASH, FIRST_SEEN_AT)

# Image statuses stored per article; only "ok" images are fed to the image tower.
IMAGE_OK = "ok"
IMAGE_MISSING = "missing"
IMAGE_CORRUPT = "corrupt"
IMAGE_TOO_LARGE = "too_large"
IMAGE_EMPTY = "empty"
IMAGE_BAD_NAME = "bad_name"
IMAGE_STATUSES = (IMAGE_OK, IMAGE_MISSING, IMAGE_CORRUPT, IMAGE_TOO_LARGE, IMAGE_EMPTY, IMAGE_BAD_NAME)
