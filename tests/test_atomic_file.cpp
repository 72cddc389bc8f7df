#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "core/atomic_file.h"
#include "core/error.h"
#include "testing.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> r;
  for (const auto& e : fs::directory_iterator(dir)) r.push_back(e.path().filename().string());
  std::sort(r.begin(), r.end());
  return r;
}

TEST(AtomicFile, CommitRenamesIntoPlace) {
  ScratchDir dir;
  const fs::path dest = dir / "out.bin";
  {
    AtomicFile f(dest);
    f.write("hello ");
    f.write("world", 5);
    EXPECT_EQ(f.bytes_written(), 11u);
    EXPECT_EQ(f.dest(), dest);
    // Until commit the only thing in the folder is the temporary sibling.
    EXPECT_FALSE(fs::exists(dest));
    const auto before = entries(dir.path());
    ASSERT_EQ(before.size(), 1u);
    EXPECT_EQ(before[0].rfind("out.bin.tmp-", 0), 0u) << before[0];
    f.commit();
  }
  EXPECT_EQ(read_bytes(dest), "hello world");
  EXPECT_EQ(entries(dir.path()), std::vector<std::string>{"out.bin"});
}

TEST(AtomicFile, CommitReplacesExistingFile) {
  ScratchDir dir;
  const fs::path dest = dir / "out.txt";
  write_bytes(dest, "old contents");
  AtomicFile f(dest);
  f.write("new");
  EXPECT_EQ(read_bytes(dest), "old contents");
  f.commit();
  EXPECT_EQ(read_bytes(dest), "new");
  EXPECT_EQ(entries(dir.path()), std::vector<std::string>{"out.txt"});
}

TEST(AtomicFile, DestructionWithoutCommitLeavesNothing) {
  ScratchDir dir;
  {
    AtomicFile f(dir / "never.bin");
    f.write("partial");
  }
  EXPECT_TRUE(entries(dir.path()).empty());

  // An existing destination is left untouched as well.
  write_bytes(dir / "kept.txt", "original");
  {
    AtomicFile f(dir / "kept.txt");
    f.write("replacement");
  }
  EXPECT_EQ(read_bytes(dir / "kept.txt"), "original");
  EXPECT_EQ(entries(dir.path()), std::vector<std::string>{"kept.txt"});
}

TEST(AtomicFile, MissingFolderErrorNamesPath) {
  ScratchDir dir;
  const fs::path dest = dir / "no" / "such" / "folder" / "out.bin";
  try {
    AtomicFile f(dest);
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dest.string()), std::string::npos) << e.what();
  }
  EXPECT_THROW(write_file_atomic(dest, "x"), Error);
}

TEST(AtomicFile, WriteOrCommitAfterCommitThrows) {
  ScratchDir dir;
  AtomicFile f(dir / "a");
  f.write("x");
  f.commit();
  EXPECT_THROW(f.write("y"), Error);
  EXPECT_THROW(f.commit(), Error);
  EXPECT_EQ(read_bytes(dir / "a"), "x");
}

TEST(AtomicFile, WriteFileAtomic) {
  ScratchDir dir;
  write_file_atomic(dir / "f.json", "{}\n");
  EXPECT_EQ(read_bytes(dir / "f.json"), "{}\n");
  write_file_atomic(dir / "f.json", "");
  EXPECT_EQ(read_bytes(dir / "f.json"), "");
  EXPECT_EQ(entries(dir.path()), std::vector<std::string>{"f.json"});
}

TEST(AtomicFile, TempSiblingIsUniqueAndBeside) {
  ScratchDir dir;
  std::set<fs::path> seen;
  for (int i = 0; i < 100; ++i) {
    const fs::path t = temp_sibling(dir / "x");
    EXPECT_EQ(t.parent_path(), dir.path());
    EXPECT_TRUE(seen.insert(t).second) << t;
  }
}

TEST(AtomicFile, DirCommitRenamesIntoPlace) {
  ScratchDir dir;
  const fs::path dest = dir / "model";
  {
    AtomicDir d(dest, false);
    EXPECT_EQ(d.dest(), dest);
    EXPECT_NE(d.path(), dest);
    write_bytes(d.path() / "a.txt", "a");
    EXPECT_FALSE(fs::exists(dest));
    d.commit();
  }
  EXPECT_EQ(read_bytes(dest / "a.txt"), "a");
  EXPECT_EQ(entries(dir.path()), std::vector<std::string>{"model"});
}

TEST(AtomicFile, DirRefusesExistingDestUnlessReplace) {
  ScratchDir dir;
  const fs::path dest = dir / "model";
  fs::create_directory(dest);
  write_bytes(dest / "old.txt", "old");
  try {
    AtomicDir d(dest, false);
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dest.string()), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_bytes(dest / "old.txt"), "old");
  EXPECT_EQ(entries(dir.path()), std::vector<std::string>{"model"});
}

TEST(AtomicFile, DirRefusesDestCreatedWhileBuilding) {
  ScratchDir dir;
  const fs::path dest = dir / "model";
  AtomicDir d(dest, false);
  write_bytes(d.path() / "new.txt", "new");
  fs::create_directory(dest);  // someone else got there first
  EXPECT_THROW(d.commit(), Error);
  EXPECT_FALSE(fs::exists(dest / "new.txt"));
}

TEST(AtomicFile, DirReplaceSwapsContent) {
  ScratchDir dir;
  const fs::path dest = dir / "model";
  fs::create_directory(dest);
  write_bytes(dest / "old.txt", "old");
  {
    AtomicDir d(dest, true);
    write_bytes(d.path() / "new.txt", "new");
    // The old folder survives until the new one is complete.
    EXPECT_TRUE(fs::exists(dest / "old.txt"));
    d.commit();
  }
  EXPECT_EQ(read_bytes(dest / "new.txt"), "new");
  EXPECT_FALSE(fs::exists(dest / "old.txt"));
  EXPECT_EQ(entries(dir.path()), std::vector<std::string>{"model"});
}

TEST(AtomicFile, DirDestructionWithoutCommitLeavesNothing) {
  ScratchDir dir;
  {
    AtomicDir d(dir / "model", false);
    fs::create_directories(d.path() / "sub");
    write_bytes(d.path() / "sub" / "x.bin", "x");
  }
  EXPECT_TRUE(entries(dir.path()).empty());
}

}  // namespace
}  // namespace qlora
