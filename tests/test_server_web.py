"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium),
against a real server process with a tiny random model."""

from __future__ import annotations

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from server_helpers import ServerProcess

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--window-size=1200,900"]


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def test_generate_from_the_page_then_find_it_in_the_gallery(browser, tiny_model_dir, tmp_path):
    server = ServerProcess(tmp_path / "out", "--model", str(tiny_model_dir))
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
        fields = {"prompt": "a red star above a blue circle", "seed": "42", "steps": "2",
                  "width": "64", "height": "64"}
        for field, value in fields.items():
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "generate").click()

        result = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results img"))[0]
        wait.until(lambda b: b.execute_script("return arguments[0].naturalWidth", result) == 64)
        assert "Seed: 42" in browser.find_element(By.CSS_SELECTOR, "#results .infotext").text

        browser.refresh()
        gallery = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery .card"))
        assert len(gallery) == 1
        assert "a red star above a blue circle" in gallery[0].find_element(By.CLASS_NAME, "infotext").text
        download = gallery[0].find_element(By.CLASS_NAME, "download").get_attribute("href")
        assert download.startswith(server.url + "/api/jobs/")

        gallery[0].find_element(By.CLASS_NAME, "use-settings").click()
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == fields["prompt"]
        assert browser.find_element(By.ID, "seed").get_attribute("value") == "42"
        assert browser.find_element(By.ID, "width").get_attribute("value") == "64"
    finally:
        server.stop()
