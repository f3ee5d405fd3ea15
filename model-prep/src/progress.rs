//! Progress bars for long steps (indicatif). Hidden automatically when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting bytes (downloads, tensor conversion).
pub fn bytes_bar(total_bytes: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:<24} [{bar:40.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static progress template is valid")
        .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// A bar counting items (tensors, files).
pub fn items_bar(total: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:<24} [{bar:40.cyan/blue}] {pos}/{len} {wide_msg}")
            .expect("static progress template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}
