"""A small headless-Chromium driver for tests: the Chrome DevTools Protocol over a
websocket, standard library only.

    with Chromium(find_chromium(), tmp_dir) as page:
        page.open("http://127.0.0.1:6006/#scalars")
        page.wait_for("deepText().includes('epoch_loss')", timeout=30)
        page.screenshot(tmp_dir / "scalars.png")

Page text is read through open shadow roots and same-origin iframes (`deepText()`),
so Polymer elements (TensorBoard's legacy dashboards) count as what a person sees."""
import base64
import json
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1400,1000")

# Defined in the page before each check: helpers that read what is shown, through
# shadow roots and same-origin iframes.
HELPERS_JS = r"""
(() => {
  const SKIP = new Set(['SCRIPT', 'STYLE', 'NOSCRIPT', 'TEMPLATE']);
  function walk(root, visit) {
    const stack = [root];
    while (stack.length) {
      const node = stack.pop();
      if (SKIP.has(node.tagName)) continue;
      visit(node);
      if (node.shadowRoot) stack.push(node.shadowRoot);
      if (node.tagName === 'IFRAME') {
        try { if (node.contentDocument) stack.push(node.contentDocument); } catch (e) {}
      }
      for (let c = node.lastChild; c; c = c.previousSibling) stack.push(c);
    }
  }
  function up(el) { return el.parentElement || (el.getRootNode() || {}).host || null; }
  function shown(el) {
    for (; el && el.nodeType === 1; el = up(el)) {
      const s = getComputedStyle(el);
      if (s.display === 'none' || s.visibility === 'hidden') return false;
    }
    return true;
  }
  function box(el) {
    const r = el.getBoundingClientRect();
    return {left: r.left, right: r.right, top: r.top, bottom: r.bottom};
  }
  function texts(root) {  // [[text, its element]] of shown text nodes under root
    const out = [];
    walk(root, n => {
      if (n.nodeType === 3 && n.nodeValue.trim() && shown(n.parentElement)) out.push([n.nodeValue.trim(), n.parentElement]);
    });
    return out;
  }
  // The shown text under root (default: the whole page), one text node a line.
  window.deepText = (root) => texts(root || document).map(t => t[0]).join('\n');
  // Shown elements matching a CSS selector, in shadow roots too.
  window.deepQuery = (selector) => {
    const out = [];
    walk(document, n => { if (n.nodeType === 1 && n.matches(selector) && shown(n)) out.push(n); });
    return out;
  };
  // The nearest ancestor (across shadow roots) of el for which test(ancestor) holds.
  window.closestWhere = (el, test) => {
    for (let a = up(el); a; a = up(a)) if (test(a)) return a;
    return null;
  };
  // Texts shown below a header cell, in its column (overlapping it horizontally): the
  // cells of a table column as a person reads them. The header is a shown text exactly
  // `header` with a text exactly `rowMate` in the same row (another header of the table).
  window.columnBelow = (header, rowMate) => {
    const all = texts(document).map(([text, el]) => [text, box(el)]).filter(t => t[1].right > t[1].left);
    const mates = all.filter(t => t[0] === rowMate).map(t => t[1]);
    const heads = all.filter(t => t[0] === header).map(t => t[1])
      .filter(h => mates.some(m => m.top < h.bottom && m.bottom > h.top));
    return all.filter(([text, b]) => heads.some(h => b.top >= h.bottom - 1 && b.left < h.right && b.right > h.left))
      .map(t => t[0]);
  };
  return true;
})()
"""


def find_chromium():
    """Path of a Chromium or Chrome binary ($CHROMIUM first), or None."""
    candidates = [os.environ.get("CHROMIUM"), "chromium", "chromium-browser",
                  "google-chrome", "google-chrome-stable"]
    for name in filter(None, candidates):
        path = shutil.which(name)
        if path:
            return path
    return None


class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: text frames, client-masked."""

    def __init__(self, url, timeout):
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        # No Origin header: Chromium then accepts the connection without --remote-allow-origins.
        self.sock.sendall((f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _recv(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("DevTools websocket closed")
        return chunk

    def _read(self, n):
        while len(self.buffer) < n:
            self.buffer += self._recv()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def send(self, text):
        data = text.encode()
        n = len(data)
        header = bytes([0x81])  # FIN, text
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def receive(self):
        """The next whole text message (pings answered, fragments joined)."""
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)  # the server never masks
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools websocket closed")
            if opcode == 0x9:  # ping -> pong
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if first & 0x80:
                    return message.decode()

    def close(self):
        self.sock.close()


class Chromium:
    """Headless Chromium with a fresh profile; as a context manager yields its one page."""

    def __init__(self, binary, work_dir, timeout=30):
        self.binary, self.timeout = binary, timeout
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=work_dir)
        self.log_path = pathlib.Path(work_dir) / "chromium.log"
        self.process = self.ws = None
        self.next_id = 0

    def __enter__(self):
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            port = self._devtools_port()
            deadline = time.monotonic() + self.timeout
            while True:  # the first tab appears shortly after the DevTools port
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("Chromium opened no page")
                time.sleep(0.2)
            self.ws = WebSocket(pages[0]["webSocketDebuggerUrl"], self.timeout)
            self.call("Page.enable")
            self.call("Runtime.enable")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _devtools_port(self):
        """The port Chromium chose (--remote-debugging-port=0), from DevToolsActivePort."""
        path = pathlib.Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Chromium exited with {self.process.returncode} at start-up; "
                                   f"its output: {self.log_path.read_text(errors='replace')[-2000:]}")
            lines = path.read_text().split("\n") if path.exists() else []
            if lines and lines[0].strip().isdigit():
                return int(lines[0])
            if time.monotonic() > deadline:
                raise TimeoutError(f"Chromium wrote no DevToolsActivePort within {self.timeout} s")
            time.sleep(0.1)

    def __exit__(self, *exc):
        if self.ws:
            try:
                self.call("Browser.close", timeout=5)
            except Exception:
                pass
            self.ws.close()
        if self.process and self.process.poll() is None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method, timeout=None, **params):
        """One DevTools command; its result (events in between are dropped)."""
        self.next_id += 1
        self.ws.sock.settimeout(timeout or self.timeout)
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.receive())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression):
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"JavaScript error: {details.get('exception', details)}")
        return result["result"].get("value")

    def open(self, url):
        """Navigates the page to url (a change of hash only, too)."""
        self.call("Page.navigate", url=url)

    def wait_for(self, expression, timeout, reload_every=None):
        """Polls a JavaScript expression (HELPERS_JS's functions defined) until it is
        truthy; returns its value, or raises TimeoutError with the page's text.
        reload_every: seconds after which the page is loaded again (for data that the
        server had not read yet when the page asked)."""
        start = last_load = time.monotonic()
        while True:
            try:
                self.evaluate(HELPERS_JS)
                value = self.evaluate(expression)
            except RuntimeError:  # the page is between documents
                value = None
            if value:
                return value
            now = time.monotonic()
            if now - start > timeout:
                raise TimeoutError(f"after {timeout} s the page still fails `{expression}`; "
                                   f"its text:\n{self.text()[:3000]}")
            if reload_every and now - last_load > reload_every:
                self.call("Page.reload")
                last_load = now
            time.sleep(0.5)

    def text(self):
        """The visible text of the page, shadow roots and iframes included."""
        try:
            self.evaluate(HELPERS_JS)
            return self.evaluate("deepText()") or ""
        except RuntimeError as e:
            return f"(no text: {e})"

    def screenshot(self, path):
        """A PNG of the viewport written to path."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        pathlib.Path(path).write_bytes(base64.b64decode(data))
        return path
