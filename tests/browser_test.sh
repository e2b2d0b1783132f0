#!/usr/bin/env bash
# Renders an HtmlReport in headless Chromium (Debian's chromium, which scripts/install-deps.sh
# installs for the tests): the page's script must draw every heatmap and log no error, and the
# screenshot must not be blank. Usage: browser_test.sh WRITE_REPORT PNG_CHECK [SCREENSHOT_COPY]
set -euo pipefail
write_report=$1 png_check=$2 keep=${3:-}
browser=$(command -v chromium || true)
if [ -z "$browser" ]; then echo "chromium is not installed: scripts/install-deps.sh installs it"; exit 77; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$write_report" "$work/report.html"
# --no-sandbox: the suite runs as root in CI, where Chromium's sandbox refuses to start.
browse() {  # browse PAGE OPTIONS...
    local page=$1
    shift
    timeout 120 "$browser" --headless --no-sandbox --disable-gpu --no-first-run --hide-scrollbars \
        --user-data-dir="$work/profile" --window-size=1000,3000 --virtual-time-budget=10000 "$@" "file://$page"
}
status=0
# Whatever a page logs (console.error, an uncaught exception) reaches stderr as ":CONSOLE" lines;
# a page with an error shows that this Chromium still reports it, or the check below proves nothing.
printf '<!DOCTYPE html>\n<body><script>undefined_function();</script></body>\n' > "$work/broken.html"
browse "$work/broken.html" --enable-logging=stderr --v=0 --dump-dom > /dev/null 2> "$work/broken.log"
grep -q ':CONSOLE' "$work/broken.log" || { echo "FAIL: Chromium did not report a broken page's error"; status=1; }
browse "$work/report.html" --enable-logging=stderr --v=0 --dump-dom > "$work/dom.html" 2> "$work/console.log"
drawn=$(sed -n 's/.*data-heatmaps-drawn="\([0-9]*\)".*/\1/p' "$work/dom.html" | head -n 1)
echo "heatmaps drawn by the page's script: ${drawn:-none}"
# Two layers of one GRU: two heatmaps.
[ "$drawn" = 2 ] || { echo "FAIL: expected 2 heatmaps drawn"; status=1; }
if grep ':CONSOLE' "$work/console.log"; then echo "FAIL: the report logged the messages above"; status=1; fi
browse "$work/report.html" --screenshot="$work/shot.png" > /dev/null 2>&1
"$png_check" "$work/shot.png" || status=1
[ -z "$keep" ] || cp "$work/shot.png" "$keep"
exit $status
