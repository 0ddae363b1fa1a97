"""A local stand-in for a social site, for the extension's browser tests: one page per upload path
(a plain file-input form, a drag-and-drop zone, a paste target, and scripted fetch / XMLHttpRequest
uploads) and an /upload endpoint that keeps what it received."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Upload:
    path: str
    filename: str
    content_type: str
    data: bytes


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1>{body}<pre id="log"></pre>
<script>
const log = (text) => document.getElementById('log').textContent += text + '\\n';
async function sendWithFetch(file) {{
  const form = new FormData();
  form.append('caption', 'holiday');
  form.append('photo', file, file.name);
  const response = await fetch('/upload?via=fetch', {{method: 'POST', body: form}});
  log('fetch ' + response.status);
}}
function sendWithXhr(file) {{
  const form = new FormData();
  form.append('photo', file, file.name);
  const xhr = new XMLHttpRequest();
  xhr.open('POST', '/upload?via=xhr');
  xhr.onload = () => log('xhr ' + xhr.status);
  xhr.onerror = () => log('xhr error');
  xhr.send(form);
}}
{script}
</script></body></html>"""

PAGES = {
    "form": ("File input", """<form id="form" method="post" action="/upload?via=form" enctype="multipart/form-data">
<input type="file" id="file" name="photo" accept="image/*"><input type="text" name="caption" value="hi">
<button id="post">Post</button></form>""", ""),
    "drop": ("Drag and drop", '<div id="zone" style="width:300px;height:200px;border:2px dashed #888">Drop a photo</div>',
             """const zone = document.getElementById('zone');
zone.addEventListener('dragover', (e) => e.preventDefault());
zone.addEventListener('drop', (e) => { e.preventDefault(); for (const f of e.dataTransfer.files) sendWithFetch(f); });"""),
    "paste": ("Paste", '<div id="target" contenteditable="true" style="width:300px;height:100px;border:1px solid #888"></div>',
              """document.getElementById('target').addEventListener('paste', (e) => {
  const file = e.clipboardData.files[0]; if (file) { e.preventDefault(); sendWithXhr(file); } });"""),
    "scripted": ("Scripted upload", "<p>uploads through sendWithFetch / sendWithXhr</p>", ""),
}


class SocialSite:
    """Runs the site on its own event loop in a thread, on a free loopback port."""

    def __init__(self) -> None:
        self.uploads: list[Upload] = []
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)

        async def page(request: web.Request) -> web.Response:
            if request.match_info["name"] not in PAGES:
                raise web.HTTPNotFound()
            title, body, script = PAGES[request.match_info["name"]]
            return web.Response(text=PAGE.format(title=title, body=body, script=script), content_type="text/html")

        async def upload(request: web.Request) -> web.Response:
            reader = await request.multipart()
            async for part in reader:
                if part.filename is not None:
                    self.uploads.append(Upload(request.query.get("via", ""), part.filename,
                                               part.headers.get("Content-Type", ""), await part.read()))
            return web.Response(text="<p>posted</p>", content_type="text/html")

        app.router.add_get("/{name}", page)
        app.router.add_post("/upload", upload)
        return app

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self._app())
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._runner = runner
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> SocialSite:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, page: str) -> str:
        return f"http://127.0.0.1:{self.port}/{page}"
