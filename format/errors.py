"""The one error type for anything wrong with an artifact: bad structure, bad metadata, failed digests."""


class ArtifactError(Exception):
    """An artifact cannot be written or read as the format requires; the message names the problem."""
