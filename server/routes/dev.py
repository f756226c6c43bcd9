"""Pages for trying the API in a browser; mounted only when ``DEV_PAGES`` is on."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(prefix="/dev", include_in_schema=False)

DEV_FORM_ID = "contact"  # the form `emailq dev` writes into its forms file

# No JavaScript: the plain <form> a static site would paste in. `_gotcha` is the honeypot,
# hidden from people and left empty by them.
CONTACT_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>emailq contact form</title></head>
<body>
<h1>Contact us</h1>
<form id="contact" method="post" action="/api/v1/forms/{DEV_FORM_ID}">
  <p><label>Name <input name="name" id="name" required></label></p>
  <p><label>Email <input type="email" name="email" id="email" required></label></p>
  <p><label>Message <textarea name="message" id="message" required></textarea></label></p>
  <p style="display:none"><label>Leave empty <input name="_gotcha" tabindex="-1"
     autocomplete="off"></label></p>
  <p><button type="submit" id="send">Send</button></p>
</form>
</body></html>
"""

THANKS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Thank you</title></head>
<body><h1 id="thanks">Thank you, your message was sent.</h1></body></html>
"""


@router.get("/contact")
async def contact_page() -> HTMLResponse:
    """A static contact form posting to the dev form."""
    return HTMLResponse(CONTACT_PAGE)


@router.get("/thanks")
async def thanks_page() -> HTMLResponse:
    """The dev form's thank-you page."""
    return HTMLResponse(THANKS_PAGE)
