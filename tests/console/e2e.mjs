// The claim console in a real browser (Debian's chromium, headless), driven by Playwright.
// Run by tests/console_e2e.rs against a real lobby, which passes, by environment:
//   LOBBY_URL   the API base URL (the console is at /console/)
//   TOKEN       a tenant token
//   CODE        the claim code of a device waiting in that lobby
//   SCREENSHOT  where to write a screenshot of the page after the claim
// Exits 0 when the person at the page signed in, pasted the code, saw the device claimed
// and listed as ready; prints why not otherwise.
import { chromium } from "playwright-core";

const { LOBBY_URL, TOKEN, CODE, SCREENSHOT } = process.env;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-default-apps", "--disable-extensions",
    "--disable-sync", "--no-first-run", "--metrics-recording-only"],
});
try {
  // A phone-sized screen.
  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
  page.on("pageerror", (e) => { console.error("page error:", e.message); process.exitCode = 1; });
  await page.goto(`${LOBBY_URL}/console/`);
  await page.fill("#token", TOKEN);
  await page.dispatchEvent("#token", "change");
  await page.fill("#code", CODE);
  await page.click("#claim");
  await page.waitForFunction(
    () => /claimed .* ready/.test(document.querySelector("#result")?.textContent ?? ""),
    null, { timeout: 10000 });
  // The token is kept for the session, never in the URL.
  const kept = await page.evaluate(() => sessionStorage.getItem("lobby-token"));
  if (kept !== TOKEN) throw new Error("the token was not kept in session storage");
  if (page.url().includes(TOKEN)) throw new Error("the token is in the URL");
  // The device list shows it ready.
  await page.click("#refresh");
  await page.waitForFunction(
    () => [...document.querySelectorAll("#devices tr")].some((tr) => /ready/.test(tr.textContent)),
    null, { timeout: 10000 });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  console.log("claimed and listed as ready");
} catch (e) {
  console.error(String(e));
  process.exitCode = 1;
} finally {
  await browser.close();
}
