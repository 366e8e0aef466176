// The claim console in a real browser (Debian's chromium, headless), driven by Playwright.
// Run by tests/console_e2e.rs against a real lobby, which passes, by environment:
//   LOBBY_URL   the API base URL (the console is at /console/)
//   TOKEN       a tenant's token;  ADMIN  the operator's token
//   CODE        the claim code of device ONE (typed / pasted)
//   QR_PNG      a PNG of device TWO's label, made by `lobby claim-code --png`
//   ONE, TWO    those devices' ids;  WAITING  the id of an unclaimed device that is connected
//   SCREENSHOT  where to write a screenshot of the page
//   SPKI        with an HTTPS LOBBY_URL: the base64 SHA-256 of the API certificate's public
//               key, which chromium trusts (as if the dev CA were installed)
// Exits 0 when every step a person would take worked; prints the failing step otherwise.
import { chromium } from "playwright-core";

const env = process.env;
const browser = await chromium.launch({
  executablePath: env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-default-apps", "--disable-extensions",
    "--disable-sync", "--no-first-run", "--metrics-recording-only",
    ...(env.SPKI ? [`--ignore-certificate-errors-spki-list=${env.SPKI}`] : [])],
});
let step = "start";
const timeout = 15000;
try {
  // A phone-sized screen.
  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
  page.on("pageerror", (e) => { console.error("page error:", e.message); process.exitCode = 1; });
  await page.goto(`${env.LOBBY_URL}/console/`);

  step = "a secure origin with the camera API";
  const secure = await page.evaluate(() => ({
    secure: window.isSecureContext,
    camera: !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia),
  }));
  if (env.LOBBY_URL.startsWith("https:") && !(secure.secure && secure.camera)) {
    throw new Error(`not a secure context with getUserMedia: ${JSON.stringify(secure)}`);
  }

  step = "tenant signs in";
  await page.getByLabel("API token").fill(env.TOKEN);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.waitForSelector("#who:has-text('tenant')", { timeout });
  const kept = await page.evaluate(() => sessionStorage.getItem("lobby-token"));
  if (kept !== env.TOKEN) throw new Error("the token is not in session storage");
  if (page.url().includes(env.TOKEN)) throw new Error("the token is in the URL");

  step = "paste a code and see the device turn ready";
  await page.getByLabel("Claim code").fill(env.CODE);
  await page.getByRole("button", { name: "Claim", exact: true }).click();
  await page.waitForSelector("#claim-state[data-state=ready]", { timeout });

  step = "read the label from a photo (QR decoded in the page)";
  await page.setInputFiles("#photo", env.QR_PNG);
  await page.waitForFunction(
    (two) => document.querySelector("#claim-state")?.dataset.state === "ready"
      && document.querySelector("#claim-state").textContent.length > 0
      && [...document.querySelectorAll("#devices tr")].some((tr) => tr.dataset.device === two),
    env.TWO, { timeout });

  step = "filter the list by state";
  await page.getByLabel("Show").selectOption("ready");
  await page.waitForSelector(`#devices tr[data-device='${env.ONE}']`, { timeout });
  await page.screenshot({ path: env.SCREENSHOT, fullPage: true });

  step = "unclaim with a confirmation";
  page.once("dialog", (d) => d.accept());
  await page.locator(`#devices tr[data-device='${env.ONE}'] button`).click();
  await page.waitForSelector(`#devices tr[data-device='${env.ONE}']`, { state: "detached", timeout });

  step = "the operator sees tenants and the devices waiting in the lobby";
  const op = await browser.newPage({ viewport: { width: 1024, height: 768 } });
  await op.goto(`${env.LOBBY_URL}/console/`);
  await op.getByLabel("API token").fill(env.ADMIN);
  await op.getByRole("button", { name: "Sign in" }).click();
  await op.waitForSelector("#who:has-text('operator')", { timeout });
  await op.waitForSelector("#tenants tr[data-tenant='acme']", { timeout });
  await op.getByLabel("Show").selectOption("unclaimed");
  await op.waitForSelector(`#devices tr[data-device='${env.WAITING}']:has-text('mqtt')`, { timeout });

  step = "the operator creates a tenant and edits its endpoint and mode";
  await op.getByLabel("Id", { exact: true }).fill("beta");
  await op.getByLabel("Name", { exact: true }).fill("Beta Corp");
  await op.getByLabel("Endpoint (host name)").fill("iot.beta.example");
  await op.getByRole("button", { name: "Create tenant" }).click();
  await op.waitForSelector("#t-status:has-text('Created beta. Its token (shown once): lobby_t_')", { timeout });
  await op.waitForSelector("#tenants tr[data-tenant='beta']", { timeout });
  const answers = ["iot2.beta.example", "redirect"];
  op.on("dialog", (d) => d.accept(answers.shift()));
  await op.getByRole("button", { name: "Edit the endpoint and mode of beta" }).click();
  await op.waitForSelector("#tenants tr[data-tenant='beta']:has-text('iot2.beta.example')", { timeout });
  await op.waitForSelector("#t-status:has-text('beta: redirect to iot2.beta.example.')", { timeout });
  console.log("every step passed");
} catch (e) {
  console.error(`step "${step}" failed: ${e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
