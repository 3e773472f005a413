// The operator console in Debian's headless Chromium, driven by playwright-core (no browser of
// its own). Run by tests/console_browser.rs against a console beside a worker pod, with a DLQ
// holding a group of `permanent_api_error` dead letters that Genesys now accepts.
//
// Environment: BASE_URL, VIEWER_TOKEN, OPERATOR_TOKEN, LOOKUP_KEY (a key in that group),
// SHOTS_DIR (screenshots of each view), CHROMIUM (default /usr/bin/chromium).
// LOOK_ONLY=1 (benches/console.rs, 100,000 dead letters): the viewer's part only, timed, with
// GROUP_REASON (default permanent_api_error) and LOOKUP_EXPECT (default session_init).
// Prints one JSON line of what it measured; exits 1 with the reason on the first failure.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`${name} is not set`);
  return v;
};
const base = env("BASE_URL");
const shots = env("SHOTS_DIR");
const lookupKey = env("LOOKUP_KEY");
const lookOnly = process.env.LOOK_ONLY === "1";
const reason = env("GROUP_REASON", "permanent_api_error");
const lookupExpect = env("LOOKUP_EXPECT", "session_init");
mkdirSync(shots, { recursive: true });

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function signIn(page, name, token) {
  await page.goto(base);
  await page.fill("#operator-name", name);
  await page.fill("#token", token);
  await page.click("#sign-in-form button[type=submit]");
  await page.waitForSelector("#groups tbody tr", { timeout: 30000 });
}

async function openGroup(page, reason) {
  await page.click(`#groups tbody tr:has-text("${reason}")`);
  await page.waitForSelector("#messages tbody tr", { timeout: 30000 });
}

async function lookUp(page, id) {
  await page.fill("#lookup-id", id);
  await page.click("#lookup-form button[type=submit]");
  await page.waitForSelector("#timeline li", { timeout: 30000 });
  return page.locator("#timeline").innerText();
}

async function main() {
  const browser = await chromium.launch({
    executablePath: env("CHROMIUM", "/usr/bin/chromium"),
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const measured = {};
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const violations = [];
    page.on("console", m => {
      if (m.type() === "error" && /Content Security Policy/i.test(m.text())) violations.push(m.text());
    });

    // A viewer sees the overview and the groups, looks a key up, and cannot plan a replay.
    const loadStarted = Date.now();
    await signIn(page, "vic", env("VIEWER_TOKEN"));
    measured.page_to_groups_ms = Date.now() - loadStarted;
    await page.screenshot({ path: join(shots, "1-overview.png"), fullPage: true });
    const lookupStarted = Date.now();
    const timeline = await lookUp(page, lookupKey);
    measured.lookup_ms = Date.now() - lookupStarted;
    check(timeline.includes(lookupExpect), `the key's timeline shows ${lookupExpect}: ${timeline}`);
    await page.screenshot({ path: join(shots, "2-lookup.png"), fullPage: true });
    const groupStarted = Date.now();
    await openGroup(page, reason);
    measured.group_view_ms = Date.now() - groupStarted;
    await page.screenshot({ path: join(shots, "3-group.png"), fullPage: true });
    const messageStarted = Date.now();
    await page.click("#messages tbody tr:first-child");
    await page.waitForFunction(() => document.getElementById("message-json").textContent.includes("x-failure-reason"));
    measured.message_view_ms = Date.now() - messageStarted;
    const whole = await page.locator("#message-json").innerText();
    check(whole.includes(`"${reason}"`) && whole.includes("body"), `the message shows its headers and body: ${whole}`);
    await page.waitForSelector("#timeline li", { timeout: 30000 });
    await page.screenshot({ path: join(shots, "3c-message.png"), fullPage: true });
    if (lookOnly) {
      const rows = await page.locator("#messages tbody tr").count();
      const moreStarted = Date.now();
      await page.click("#more");
      await page.waitForFunction(n => document.querySelectorAll("#messages tbody tr").length > n, rows);
      measured.next_page_ms = Date.now() - moreStarted;
      measured.rows_shown = await page.locator("#messages tbody tr").count();
      await page.screenshot({ path: join(shots, "3b-next-page.png") });
      check(violations.length === 0, `no Content-Security-Policy violations: ${violations.join("; ")}`);
      console.log(JSON.stringify(measured));
      return;
    }
    await page.click("#plan");
    await page.waitForFunction(() => document.getElementById("status").textContent.includes("operator token"));
    check(await page.locator("#plan-view").isHidden(), "a viewer gets no plan");

    // An operator plans the group, replays it, watches it pace and finish.
    await page.click("#sign-out");
    await signIn(page, "alice", env("OPERATOR_TOKEN"));
    await openGroup(page, reason);
    await page.click("#plan");
    await page.waitForSelector("#plan-view:not([hidden])");
    const summary = await page.locator("#plan-summary").innerText();
    check(/call \d+/.test(summary), `the plan classifies its messages: ${summary}`);
    await page.screenshot({ path: join(shots, "4-plan.png"), fullPage: true });
    const seen = [];
    const replayStarted = Date.now();
    await page.click("#apply");
    for (;;) {
      const text = await page.locator("#progress").innerText();
      if (seen.length === 0 || seen[seen.length - 1].text !== text) {
        seen.push({ at_ms: Date.now() - replayStarted, text });
      }
      if (/^(done|stopped|aborted|failed)/.test(text)) break;
      check(Date.now() - replayStarted < 120000, `the replay did not end in 2 minutes: ${text}`);
      await page.waitForTimeout(100);
    }
    const last = seen[seen.length - 1].text;
    check(last.startsWith("done"), `the replay finished: ${last}`);
    measured.replay_ms = Date.now() - replayStarted;
    measured.progress = seen;
    await page.screenshot({ path: join(shots, "5-replay.png"), fullPage: true });

    // The replay is in the key's timeline, with who did it.
    const after = await lookUp(page, lookupKey);
    check(/dlq_replay replayed by alice/.test(after), `the audit trail names the operator: ${after}`);
    await page.screenshot({ path: join(shots, "6-audit.png"), fullPage: true });
    check(violations.length === 0, `no Content-Security-Policy violations: ${violations.join("; ")}`);
    console.log(JSON.stringify(measured));
  } finally {
    await browser.close();
  }
}

main().catch(e => {
  console.error(`browser test failed: ${e.message}`);
  process.exit(1);
});
