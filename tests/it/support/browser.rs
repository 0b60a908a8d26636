//! A real headless Chromium, driven over the W3C WebDriver protocol by Debian's
//! `chromedriver` (which `scripts/browser.sh` installs), with plain HTTP calls.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A chromedriver process and one headless browser session in it.
pub struct Browser {
    driver: tokio::process::Child,
    base: String,
    http: reqwest::Client,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session.
    pub async fn start() -> Browser {
        let mut driver = tokio::process::Command::new("chromedriver")
            .arg("--port=0")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver (scripts/browser.sh installs Debian's chromium-driver)");
        let mut lines = BufReader::new(driver.stdout.take().expect("stdout")).lines();
        let port = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.expect("read chromedriver") {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').parse::<u16>().expect("port");
                }
            }
            panic!("chromedriver exited before it started");
        })
        .await
        .expect("chromedriver started in time");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let session = browser
            .call(
                reqwest::Method::POST,
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": "/usr/bin/chromium",
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                 "--disable-dev-shm-usage", "--window-size=1400,900"]
                    }
                }}}),
            )
            .await;
        let id = session["sessionId"]
            .as_str()
            .expect("session id")
            .to_string();
        browser.base = format!("{}/session/{id}", browser.base);
        browser
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if method == reqwest::Method::POST {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.expect("webdriver call");
        let status = response.status();
        let text = response.text().await.expect("webdriver answer");
        let value: Value = serde_json::from_str(&text).expect("webdriver JSON");
        assert!(status.is_success(), "webdriver {path}: {status} {text}");
        value["value"].clone()
    }

    /// Loads `url` and waits for the document.
    pub async fn open(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    /// The elements that match a CSS selector, in document order.
    pub async fn find_all(&self, selector: &str) -> Vec<String> {
        let found = self
            .call(
                reqwest::Method::POST,
                "/elements",
                json!({"using": "css selector", "value": selector}),
            )
            .await;
        found
            .as_array()
            .expect("element list")
            .iter()
            .map(|element| {
                element
                    .as_object()
                    .and_then(|object| object.values().next())
                    .and_then(Value::as_str)
                    .expect("element reference")
                    .to_string()
            })
            .collect()
    }

    /// The rendered text of an element.
    pub async fn text(&self, element: &str) -> String {
        let value = self
            .call(
                reqwest::Method::GET,
                &format!("/element/{element}/text"),
                Value::Null,
            )
            .await;
        value.as_str().unwrap_or_default().to_string()
    }

    /// An attribute of an element.
    pub async fn attribute(&self, element: &str, name: &str) -> String {
        let value = self
            .call(
                reqwest::Method::GET,
                &format!("/element/{element}/attribute/{name}"),
                Value::Null,
            )
            .await;
        value.as_str().unwrap_or_default().to_string()
    }

    /// A PNG screenshot of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let value = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(value.as_str().expect("base64 PNG"))
            .expect("PNG bytes")
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        self.call(reqwest::Method::DELETE, "", Value::Null).await;
        let _ = self.driver.kill().await;
    }
}
