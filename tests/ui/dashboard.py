"""Drives meshgate's dashboard in headless Chromium (Debian's chromium,
chromium-driver and python3-selenium) and checks what an operator sees.

Usage: dashboard.py live BASE TOKEN SOCKS BACKEND SCREENSHOT
       dashboard.py scale BASE TOKEN FLOWS SCREENSHOT

Prints one JSON line of measurements; any failed check exits non-zero with
a message saying what was expected.
"""
import json
import subprocess
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

NAME = "<script>alert(1)</script>"


def fail(msg):
    print("FAILED: " + msg, file=sys.stderr)
    sys.exit(1)


def wait(cond, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if cond():
                return
        except Exception:  # an element mid-update: try again
            pass
        time.sleep(0.05)
    fail(what + f" (not within {timeout} s)")


def browser():
    o = Options()
    o.binary_location = "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1500,1100"]:
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
    d.set_page_load_timeout(30)
    d.set_script_timeout(30)
    return d


def login(d, base, token, tenant):
    d.get(base + "/ui/#tenant=" + tenant)
    wait(lambda: d.find_element(By.ID, "login").is_displayed(), 10,
         "the page asks for the token")
    d.find_element(By.ID, "token").send_keys(token)
    d.find_element(By.CSS_SELECTOR, "#login button").click()
    wait(lambda: d.execute_script("return window.meshgateStats.updates") >= 1, 15,
         "a live update arrives after the token is given")


def errors(d):
    return [l for l in d.get_log("browser") if l["level"] == "SEVERE"]


def stats(d):
    return d.execute_script("return window.meshgateStats")


def live(base, token, socks, backend, shot):
    d = browser()
    try:
        login(d, base, token, "acme")
        handshake = lambda: d.execute_script(
            "return [...document.querySelectorAll('#peers td.handshake')].map(e => e.textContent)")
        wait(lambda: handshake() and handshake()[0] != "never", 15,
             "a WireGuard peer's handshake shows")
        first_age = handshake()[0]
        identities = lambda: d.execute_script(
            "return [...document.querySelectorAll('#flows td.identity')].map(e => e.textContent)")
        if NAME in identities():
            fail("the flow shows before it exists")
        curl = subprocess.Popen(
            ["curl", "-s", "-m", "30", "--socks5", socks, "-U", NAME + ":pw", backend],
            stdout=subprocess.PIPE)
        started = time.time()
        wait(lambda: NAME in identities(), 2.0, "the SOCKS flow appears in the table")
        appeared = time.time() - started
        # The user name is text, not markup: no script element anywhere in
        # the page's tables, and the cell's text is the name itself.
        scripts = d.execute_script("return document.querySelectorAll('main script').length")
        if scripts != 0:
            fail(f"{scripts} script elements inside the dashboard")
        if d.execute_script("return window.__xss === true"):
            fail("injected script ran")
        d.save_screenshot(shot)
        out, _ = curl.communicate(timeout=40)
        if out != b"slow ok\n":
            fail(f"curl through the SOCKS door got {out!r}")
        ended = time.time()
        wait(lambda: NAME not in identities(), 3.0, "the flow leaves the table once it ended")
        gone = time.time() - ended
        wait(lambda: handshake()[0] != first_age, 5, "the handshake age updates")
        # The tenant's bytes count what its ended flow moved.
        moved = lambda: d.execute_script(
            "return [...document.querySelectorAll('#tenants tbody tr')]"
            ".find(r => r.cells[0].textContent === 'acme').cells[3].textContent")
        wait(lambda: moved() not in ("0 B", ""), 3, "acme's bytes include the ended flow")
        bad = errors(d)
        if bad:
            fail(f"console errors: {bad}")
        s = stats(d)
        print(json.dumps({"flow_appeared_s": round(appeared, 2), "flow_gone_s": round(gone, 2),
                          "handshake_age": [first_age, handshake()[0]], "acme_bytes": moved(),
                          "updates": s["updates"], "update_bytes": s["lastBytes"],
                          "screenshot": shot}))
    finally:
        d.quit()


def scale(base, token, flows, shot):
    d = browser()
    try:
        t0 = time.time()
        login(d, base, token, "acme")
        wait(lambda: d.execute_script(
            "return document.getElementById('flow-count').textContent.includes('of " + flows + "')"),
            20, f"the flow count shows {flows}")
        loaded = time.time() - t0
        wait(lambda: d.execute_script("return document.querySelectorAll('#tenants tbody tr').length") >= 1000,
             10, "1,000 tenant rows")
        # Responsive: a click on another tenant answers at once.
        before = stats(d)["updates"]
        t1 = time.time()
        d.execute_script("document.querySelector('#tenants tbody tr:nth-child(2) button').click()")
        wait(lambda: stats(d)["updates"] > before and d.find_element(By.ID, "tenant-name").text != "Tenant acme",
             20, "another tenant opens")
        switched = time.time() - t1
        d.save_screenshot(shot)
        bad = errors(d)
        if bad:
            fail(f"console errors: {bad}")
        s = stats(d)
        print(json.dumps({"load_s": round(loaded, 2), "first_render_ms": round(s["firstRenderMs"]),
                          "switch_s": round(switched, 2), "largest_update_bytes": s["maxBytes"],
                          "slowest_render_ms": round(s["maxRenderMs"], 1), "screenshot": shot}))
    finally:
        d.quit()


if __name__ == "__main__":
    if sys.argv[1] == "live":
        live(*sys.argv[2:7])
    else:
        scale(*sys.argv[2:6])
