"""An address's domain in IDNA form, and matching addresses against configured lists.

Addresses are stored as given (email-validator's normalized form, Unicode domains); every
comparison with a configured list (API keys' domains and senders, ALLOWED_RECIPIENTS,
ALLOWED_SENDERS) and the envelope (``emailq.message``) use the domain's IDNA form.
"""

from __future__ import annotations

import functools

from email_validator import EmailNotValidError, validate_email


@functools.lru_cache(maxsize=256)
def ascii_domain(domain: str) -> str:
    """``domain`` in IDNA form (``bücher.example``: ``xn--bcher-kva.example``), as
    email-validator writes it for the envelope; unchanged if ASCII or not a domain."""
    if domain.isascii():
        return domain
    try:
        return str(validate_email("x@" + domain, check_deliverability=False).ascii_domain)
    except EmailNotValidError:
        return domain  # matches no listed domain: every list entry is ASCII


def domain_of(address: str) -> str:
    """The lower-case domain of an address, in IDNA form.

    The API stores ``user@bücher.example`` as given, lists of domains in the settings are
    held in IDNA form (``bücher.example`` there becomes ``xn--bcher-kva.example``), and the
    worker sends that form: compared so, a listed domain matches in either spelling (a
    list could only name ``xn--bcher-kva.example`` before, and then matched no recipient),
    and a look-alike (``xn--exmple-4nf.com``: example.com with a Cyrillic a) never
    matches the domain it imitates.
    """
    return ascii_domain(address.rpartition("@")[2].lower().rstrip("."))


def in_domains(address: str, domains: frozenset[str]) -> bool:
    """Is ``address`` in one of ``domains`` (exactly: subdomains are not included)?"""
    return domain_of(address) in domains


def in_allow_list(address: str, allowed: frozenset[str]) -> bool:
    """Is ``address`` listed itself, or by its ``@domain``?"""
    domain = domain_of(address)
    local = address.rpartition("@")[0].lower()
    return f"{local}@{domain}" in allowed or "@" + domain in allowed
