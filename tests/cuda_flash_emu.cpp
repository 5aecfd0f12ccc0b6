// Runs kiln's fused prefill attention (targets/cuda/flash.py) under the CPU emulation of tests/cuda_emu.h.
// usage: flash_emu DIR B T P MP SCALE_LOG2 — reads DIR/{q,cache,pt,pos}.bin, writes DIR/o.bin;
// the kernel's template arguments come as -DKD, -DKREP, -DKKVH, -DKPAGE, -DKWIN.
#include "cuda_emu.h"
#include KILN_KERNEL_SOURCE

#include <cstdio>
#include <cstdlib>
#include <string>

template <typename X>
static std::vector<X> load(const std::string& path, size_t n) {
  std::vector<X> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(X), n, f) != n) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", n, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

int main(int argc, char** argv) {
  if (argc != 7) return 2;
  const std::string dir = argv[1];
  const long long B = std::atoll(argv[2]), T = std::atoll(argv[3]), P = std::atoll(argv[4]), MP = std::atoll(argv[5]);
  const float scale_log2 = std::strtof(argv[6], nullptr);
  const long long H = (long long)KREP * KKVH;
  auto q = load<float>(dir + "/q.bin", B * H * T * KD);
  auto cache = load<half>(dir + "/cache.bin", P * 2 * KKVH * KPAGE * KD);
  auto pt = load<int>(dir + "/pt.bin", B * MP);
  auto pos = load<int>(dir + "/pos.bin", B * T);
  std::vector<float> o(B * H * T * KD, -7.0f);  // rows the kernel must write start as garbage
  const int gx = (int)((KREP * T + 63) / 64), gy = (int)(B * KKVH);
  emu_launch(gx, gy, 128, [&] {
    kiln_flash<KD, KREP, KKVH, KPAGE, KWIN>(q.data(), cache.data(), pt.data(), pos.data(), o.data(), T, MP,
                                             scale_log2, (int)blockIdx.x, (int)blockIdx.y);
  });
  FILE* f = std::fopen((dir + "/o.bin").c_str(), "wb");
  std::fwrite(o.data(), sizeof(float), o.size(), f);
  std::fclose(f);
  return 0;
}
