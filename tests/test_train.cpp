// tests/test_train.cpp: rdnet_train's bookkeeping (examples/rdnet/train_util.hpp): durations,
// the progress output, metrics.csv round trips, curves.svg, and checkpoint helpers.
// Not the training loop: the rdnet_train_* CTest tests in examples/CMakeLists.txt run the program.
#include <cmath>
#include <filesystem>
#include <sstream>

#include "rdnet/train_util.hpp"
#include "test_util.hpp"

namespace test_train {

namespace tu = train_util;

namespace {
size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + what.size())) ++n;
  return n;
}
std::string temp_dir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() / ("densegrad_test_train_" + name);
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d.string();
}
}  // namespace

TEST_CASE("train_util format_duration") {
  CHECK(tu::format_duration(0) == "0:00");
  CHECK(tu::format_duration(7.4) == "0:07");
  CHECK(tu::format_duration(245) == "4:05");
  CHECK(tu::format_duration(3909) == "1:05:09");
  CHECK(tu::format_duration(-1) == "?");
  CHECK(tu::format_duration(NAN) == "?");
}

TEST_CASE("train_util nice_ticks are round and cover the range") {
  std::vector<double> t = tu::nice_ticks(0.23, 0.91);
  REQUIRE(t.size() == 5);
  CHECK(t.front() == Approx(0.2));
  CHECK(t.back() == Approx(1.0));
  CHECK(t[1] - t[0] == Approx(0.2));
  t = tu::nice_ticks(81.3, 93.7);
  CHECK(t.front() <= 81.3);
  CHECK(t.back() >= 93.7);
  CHECK(t[1] - t[0] == Approx(5.0));
  t = tu::nice_ticks(2.0, 2.0);  // one value: a small range around it
  CHECK(t.front() < 2.0);
  CHECK(t.back() > 2.0);
}

TEST_CASE("train_util Progress prints about every 10% without a tty") {
  std::ostringstream out;
  tu::Progress bar(out, false, 3, 8, 100);
  for (int64_t s = 1; s <= 100; ++s) bar.update(s, 0.5, 1e-3, s * 64, static_cast<double>(s) * 0.1);
  bar.finish();
  const std::string text = out.str();
  CHECK(count(text, "\n") == 10);
  CHECK(count(text, "\r") == 0);
  CHECK(text.find("epoch 3/8 step 10/100 loss 0.5000 lr 1.00e-03 640 img/s ETA 0:09") != std::string::npos);
  CHECK(text.find("step 100/100") != std::string::npos);
}

TEST_CASE("train_util Progress redraws one line on a tty") {
  std::ostringstream out;
  tu::Progress bar(out, true, 1, 2, 4);
  for (int64_t s = 1; s <= 4; ++s) bar.update(s, 1.25, 2e-3, s * 10, static_cast<double>(s));
  CHECK(count(out.str(), "\r") == 4);
  CHECK(count(out.str(), "\n") == 0);
  CHECK(out.str().find("[##########..........] 2/4") != std::string::npos);
  bar.finish();
  CHECK(count(out.str(), "\n") == 1);
}

TEST_CASE("train_util metrics.csv header and round trip") {
  std::vector<tu::EpochRecord> rows = {{1, 0.812345678, 0.5, 85.12, 2e-3, 101.25}, {2, 0.45, NAN, NAN, 1e-3, 99.0}};
  const std::string csv = tu::metrics_csv(rows);
  CHECK(csv.substr(0, csv.find('\n')) == "epoch,train_loss,test_loss,test_acc,lr,seconds");
  CHECK(csv.find("\n1,0.812346,0.500000,85.12,2.000000e-03,101.2\n") != std::string::npos);
  CHECK(csv.find("\n2,0.450000,,,1.000000e-03,99.0\n") != std::string::npos);  // not evaluated: empty
  std::vector<tu::EpochRecord> back = tu::parse_metrics_csv(csv);
  REQUIRE(back.size() == 2);
  CHECK(back[0].epoch == 1);
  CHECK(back[0].test_acc == Approx(85.12));
  CHECK(std::isnan(back[1].test_loss));
  CHECK(tu::metrics_csv(back) == csv);
  REQUIRE_THROWS_WITH(tu::parse_metrics_csv("epoch,loss\n"), Catch::Contains("expected the header"));
  REQUIRE_THROWS_WITH(tu::parse_metrics_csv(csv + "3,1\n"), Catch::Contains("expected 6 fields"));
  // Malformed numbers are dg::Errors naming the cell, never std::stod's exceptions
  const std::string header = std::string(tu::kMetricsHeader) + "\n";
  REQUIRE_THROWS_AS(tu::parse_metrics_csv(header + "x,1,2,3,4,5\n"), dg::Error);
  REQUIRE_THROWS_WITH(tu::parse_metrics_csv(header + "99999999999999999999,1,2,3,4,5\n"),
                      Catch::Contains("expected an epoch number, got '99999999999999999999'"));
  REQUIRE_THROWS_WITH(tu::parse_metrics_csv(header + "1,abc,2,3,4,5\n"), Catch::Contains("'abc' is not a number"));
  REQUIRE_THROWS_WITH(tu::parse_metrics_csv(header + "1,2.5x,2,3,4,5\n"), Catch::Contains("'2.5x' is not a number"));
  CHECK(std::isinf(tu::parse_metrics_csv(header + "1,1e999,2,3,4,5\n")[0].train_loss));  // out of range: inf
}

TEST_CASE("train_util curves.svg is a complete chart") {
  std::vector<tu::EpochRecord> rows;
  for (int64_t e = 1; e <= 6; ++e)
    rows.push_back({e, 1.0 / static_cast<double>(e), 0.8 / static_cast<double>(e), 80.0 + static_cast<double>(e), 1e-3, 10});
  const std::string svg = tu::curves_svg(rows, "RDNet nano on fashion-mnist");
  CHECK(svg.rfind("<svg xmlns=\"http://www.w3.org/2000/svg\"", 0) == 0);
  CHECK(svg.find("</svg>") == svg.size() - 7);
  CHECK(count(svg, "<text") == count(svg, "</text>"));
  CHECK(count(svg, "<polyline") == 3);           // train loss, test loss, test accuracy
  CHECK(count(svg, ">epoch</text>") == 2);       // both x axes are labelled
  CHECK(svg.find(">accuracy (%)</text>") != std::string::npos);
  CHECK(svg.find(">86</text>") != std::string::npos);  // a y tick of the accuracy axis
  CHECK(svg.find("\"nan") == std::string::npos);  // no coordinate is NaN
  CHECK(svg.find(",nan") == std::string::npos);
  // no rows yet, and a single epoch, still give a valid chart
  CHECK(tu::curves_svg({}, "empty").find("</svg>") != std::string::npos);
  CHECK(count(tu::curves_svg({rows[0]}, "one"), "<circle") == 3);
}

TEST_CASE("train_util Checkpoint round trip: state dicts, counters, RNG, metadata") {
  tu::Checkpoint ck;
  ck.put("model", std::map<std::string, dg::Tensor<float>>{{"w", dg::tensor<float>({1, 2, 3, 4}, {2, 2})}});
  ck.put_int("train.epoch", 3);
  ck.put_double("train.best_acc", 91.37);
  std::mt19937_64 engine(42);
  for (int i = 0; i < 1000; ++i) engine();  // somewhere in the middle of the stream
  ck.put_rng("rng.default_generator", engine);
  ck.metadata["args"] = "--epochs=2\n";
  const std::string path = temp_dir("ckpt") + "/last.safetensors";
  ck.save(path);

  tu::Checkpoint back = tu::Checkpoint::load(path);
  auto sd = back.get<float>("model");
  REQUIRE(sd.count("w"));
  CHECK(sd["w"].to_vector() == std::vector<float>{1, 2, 3, 4});
  CHECK(back.get<float>("nothing").empty());
  CHECK(back.get_int("train.epoch") == 3);
  CHECK(back.get_double("train.best_acc") == 91.37);
  CHECK(back.meta("args") == "--epochs=2\n");
  CHECK(back.meta("absent").empty());
  std::mt19937_64 restored;
  back.get_rng("rng.default_generator", restored);
  for (int i = 0; i < 5; ++i) CHECK(restored() == engine());  // continues the same stream
  REQUIRE_THROWS_WITH(back.get_int("train.step"), Catch::Contains("no tensor 'train.step'"));
  REQUIRE_THROWS_WITH(back.get_rng("model.w", restored), Catch::Contains("does not hold a std::mt19937_64 state"));
}

TEST_CASE("train_util write_text_atomic and has_fashion_mnist") {
  const std::string dir = temp_dir("files");
  tu::write_text_atomic(dir + "/metrics.csv", "a\n");
  tu::write_text_atomic(dir + "/metrics.csv", "b\n");
  std::ifstream f(dir + "/metrics.csv");
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  CHECK(s == "b\n");
  CHECK(!std::filesystem::exists(dir + "/metrics.csv.tmp"));
  REQUIRE_THROWS_WITH(tu::write_text_atomic(dir + "/no/such/dir/x.csv", ""), Catch::Contains("cannot write"));

  CHECK(!tu::has_fashion_mnist(dir));
  CHECK(!tu::has_fashion_mnist(dir + "/missing"));
  std::filesystem::create_directories(dir + "/FashionMNIST/raw");
  std::ofstream(dir + "/FashionMNIST/raw/train-images-idx3-ubyte.gz") << "x";
  CHECK(tu::has_fashion_mnist(dir));
}

}  // namespace test_train
