//! Reading a server's `/metrics` page.

/// The value of the sample named exactly `series` (name and labels) in a scrape.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub async fn scrape(url: &str) -> String {
    reqwest::get(url)
        .await
        .expect("scrape")
        .error_for_status()
        .expect("200")
        .text()
        .await
        .expect("body")
}
